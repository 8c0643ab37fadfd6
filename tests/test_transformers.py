"""Transformers as people load them, against float64 per-sample references: GPT-2 (Conv1D,
lm_head tied to wte), Llama (grouped-query attention, LlamaRMSNorm), Gemma and T5 norms,
ViT (ViTEmbeddings through the per-module fallback, the patch Conv2d by its rule), nn.RMSNorm,
nn.MultiheadAttention in every configuration, custom modules owning raw parameters, tied
and shared weights in every reducer (norms, clipped sums, inner products, projections),
chunking, low precision, the DP-SGD step, LoRA adapters, and what is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import indivgrad_cuda as ig
from indivgrad_cuda.privacy import DPSGD
from tests.conftest import TOL
from tests.reference import clipped_sum_ref, func_module_grads, loop_module_grads, noise_ref

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
transformers.logging.set_verbosity_error()

F64 = TOL[torch.float64]


def lm_loss(out, ids):
    return F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())


def cls_loss(out, labels):
    return F.cross_entropy(out.logits if hasattr(out, "logits") else out, labels)


def check_all(model, inputs, target, loss, ref, tol=F64, **engine_kw):
    """Every reducer against the reference per-sample gradients `ref`: materialised (also in
    chunks of 2), norms per parameter, the clipped sum, inner products with a second set and
    projections (against Projection.apply on the reference)."""
    engine = ig.PerSampleGrads(model, **engine_kw)
    for chunked in (engine, ig.PerSampleGrads(model, max_chunk=2, **engine_kw)):
        got = chunked(inputs, target, loss)
        assert list(got) == list(ref)
        for name in ref:
            torch.testing.assert_close(got[name].double(), ref[name].double(), **tol, msg=name)
    norms, per_param = engine.norms(inputs, target, loss, per_param=True)
    _, ref_norms = clipped_sum_ref(ref, 1.0)
    torch.testing.assert_close(norms.double(), ref_norms, **tol)
    for name in ref:
        torch.testing.assert_close(per_param[name].double(), ref[name].flatten(1).double().norm(dim=1), **tol)
    max_norm = ref_norms.median().item()
    ref_sum, _ = clipped_sum_ref(ref, max_norm)
    engine.clipped_grad_sum(inputs, target, loss, max_norm)
    params = dict(model.named_parameters())
    for name in ref:
        torch.testing.assert_close(params[name].grad.double(), ref_sum[name], **tol, msg=name)
    flat = torch.cat([g.flatten(1).double() for g in ref.values()], 1)
    k = engine.inner_products(inputs, target, inputs, target, loss)
    torch.testing.assert_close(k.double(), flat @ flat.t(), **tol)
    proj = engine.projection(64, seed=3)
    torch.testing.assert_close(
        engine.project(inputs, target, loss, dim=64, seed=3).double(), proj.apply(ref).double(), **tol
    )
    return engine


# ---------------------------------------------------------------- Hugging Face models


def gpt2(tied=True, vocab=50, **kw):
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
        **kw,
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def padded_ids(n, t, vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_with_padding_mask(tied, device):
    torch.manual_seed(0)
    model = gpt2(tied).to(device)
    ids, mask = (t.to(device) for t in padded_ids(4, 8, 50, [8, 5, 7, 3]))
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = loop_module_grads(model, inputs, ids, lm_loss)
    engine = check_all(model, inputs, ids, lm_loss, ref)
    how = engine.describe()
    assert how["transformer.h.0.attn.c_attn.weight"] == "rule (Conv1D 'transformer.h.0.attn.c_attn')"
    if tied:
        assert "lm_head.weight" not in ref
        assert how["transformer.wte.weight"] == "tied: rule (Embedding 'transformer.wte') + rule (Linear 'lm_head')"
    else:
        assert how["lm_head.weight"] == "rule (Linear 'lm_head')"
    assert all(v.startswith(("rule", "tied")) for v in how.values())


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tied_gpt2_norms_form_no_per_sample_table():
    """The cross term between wte and lm_head comes from the factors: no op of the norms (or of
    the clipped sum) returns anything near one [V, D] table per sample."""
    torch.manual_seed(1)
    n, t, vocab, d = 4, 4, 2000, 16
    model = gpt2(True, vocab=vocab)
    ids, mask = padded_ids(n, t, vocab, [4, 3, 4, 2])
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = loop_module_grads(model, inputs, ids, lm_loss)
    engine = ig.PerSampleGrads(model)
    engine.norms(inputs, ids, lm_loss)  # the first call checks parameter uses; measure the second
    with LargestTensor() as seen:
        norms = engine.norms(inputs, ids, lm_loss)
        engine.clipped_grad_sum(inputs, ids, lm_loss, 1.0)
    torch.testing.assert_close(norms, clipped_sum_ref(ref, 1.0)[1], **F64)
    assert seen.largest < n * vocab * d // 2, (seen.largest, n * vocab * d)
    assert seen.largest >= vocab * d  # the table's summed gradient itself is formed: the probe sees tensors


def llama(**kw):
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg).double().eval()


def test_llama_grouped_query_attention(device):
    torch.manual_seed(2)
    model = llama().to(device)
    ids, mask = (t.to(device) for t in padded_ids(3, 6, 40, [6, 4, 5], seed=2))
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = loop_module_grads(model, inputs, ids, lm_loss)
    engine = check_all(model, inputs, ids, lm_loss, ref)
    assert engine.describe()["model.norm.weight"] == "rule (LlamaRMSNorm 'model.norm')"


def vit():
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg).double().eval()


def test_vit_embeddings_by_the_fallback_and_patches_by_the_conv_rule(device):
    torch.manual_seed(3)
    model = vit().to(device)
    pixels = torch.randn(4, 3, 8, 8, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 2, 1, 2], device=device)
    inputs = {"pixel_values": pixels}
    ref = loop_module_grads(model, inputs, labels, cls_loss)
    engine = check_all(model, inputs, labels, cls_loss, ref)
    how = engine.describe()
    assert how["vit.embeddings.cls_token"] == "fallback (ViTEmbeddings 'vit.embeddings')"
    assert how["vit.embeddings.position_embeddings"] == "fallback (ViTEmbeddings 'vit.embeddings')"
    assert how["vit.embeddings.patch_embeddings.projection.weight"].startswith("rule (Conv2d")
    with pytest.raises(ig.UnsupportedModuleError, match=r"'vit\.embeddings' \(ViTEmbeddings\)"):
        ig.PerSampleGrads(model, fallback=False)


# ---------------------------------------------------------------- RMS norms


class Normed(nn.Module):
    def __init__(self, norm, d=6):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, d), norm, nn.Linear(d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


class NotAnRMSNorm(nn.Module):
    """Named like one, but its output is not linear in its weight."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.weight)


NORMS = {
    "nn.RMSNorm": lambda: nn.RMSNorm(6),
    "nn.RMSNorm-2d-eps": lambda: nn.RMSNorm((2, 6), eps=1e-3),
    "Llama": lambda: transformers.models.llama.modeling_llama.LlamaRMSNorm(6, eps=1e-5),
    "Gemma": lambda: transformers.models.gemma.modeling_gemma.GemmaRMSNorm(6),
    "T5": lambda: transformers.models.t5.modeling_t5.T5LayerNorm(6),
    "Qwen2": lambda: transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm(6),
    "not-of-the-form": lambda: type("FancyRMSNorm", (NotAnRMSNorm,), {})(6),
}


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_rms_norms(kind):
    torch.manual_seed(5)
    norm = NORMS[kind]()
    with torch.no_grad():
        norm.weight.normal_()  # a trained gain, not the ones (or zeros) it starts from
    model = Normed(norm, 6).double()
    x = torch.randn(5, 3, 2, 4, dtype=torch.float64) if "2d" in kind else torch.randn(5, 3, 4, dtype=torch.float64)
    target = torch.randint(0, 3, (5,))

    def loss(out, t):
        return F.cross_entropy(out.flatten(1, -2).mean(1), t)

    ref = func_module_grads(model, x, target, loss)
    # these modules compute in float32 whatever their dtype: so do their references
    tol = F64 if kind.startswith("nn.") or kind == "not-of-the-form" else dict(rtol=1e-6, atol=1e-7)
    engine = check_all(model, x, target, loss, ref, tol=tol)
    want = "fallback" if kind == "not-of-the-form" else "rule"
    assert engine.describe()["norm.weight"].startswith(want)
    if kind == "not-of-the-form":
        refused = ig.PerSampleGrads(model, fallback=False)
        with pytest.raises(ig.UnsupportedModuleError, match=r"'norm' \(FancyRMSNorm\): named like an RMS norm"):
            refused.norms(x, target, loss)


# ---------------------------------------------------------------- nn.MultiheadAttention

MHA_CASES = {
    "batch_first": dict(batch_first=True),
    "seq_first": dict(batch_first=False),
    "kdim_vdim": dict(batch_first=True, kdim=5, vdim=3),
    "bias_kv_zero_attn": dict(batch_first=False, add_bias_kv=True, add_zero_attn=True),
    "no_bias": dict(batch_first=True, bias=False),
}


class Attending(nn.Module):
    def __init__(self, mask, need_weights, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, **kw)
        self.head = nn.Linear(8, 3)
        self.mask, self.need_weights, self.kw = mask, need_weights, kw

    def forward(self, q, k, v, pad, bias):
        """bias [N, heads, T, S]: each sample's additive attention mask (the 3-D case)."""
        bf = self.kw.get("batch_first", False)
        t, s = q.shape[1], k.shape[1]
        if not bf:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        kw = {"key_padding_mask": pad, "need_weights": self.need_weights}
        if self.mask == "2d":
            kw["attn_mask"] = torch.triu(torch.full((t, s), float("-inf"), dtype=q.dtype, device=q.device), 1)
        elif self.mask == "3d":
            kw["attn_mask"] = bias.flatten(0, 1)
        out, weights = self.mha(q, k, v, **kw)
        out = out if bf else out.transpose(0, 1)
        extra = 0 if weights is None else weights.flatten(1).sum(1, keepdim=True)
        return self.head(out.mean(1)) + extra


@pytest.mark.parametrize("mask", ["none", "2d", "3d"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_multihead_attention(case, need_weights, mask, device):
    torch.manual_seed(6)
    kw = MHA_CASES[case]
    model = Attending(mask, need_weights, **kw).double().to(device)
    n, t, s = 4, 5, 5
    f64 = dict(dtype=torch.float64, device=device)
    q = torch.randn(n, t, 8, **f64)
    k = torch.randn(n, s, kw.get("kdim", 8), **f64)
    v = torch.randn(n, s, kw.get("vdim", 8), **f64)
    pad = torch.arange(s, device=device)[None] >= torch.tensor([5, 3, 4, 2], device=device)[:, None]
    bias = torch.randn(n, 2, t, s, **f64)
    if mask != "none":  # one mask type for both (mixed types are deprecated by MHA)
        pad = torch.zeros(n, s, **f64).masked_fill(pad, float("-inf"))
    target = torch.randint(0, 3, (n,), device=device)
    inputs = (q, k, v, pad, bias)
    ref = loop_module_grads(model, inputs, target, F.cross_entropy)
    engine = check_all(model, inputs, target, F.cross_entropy, ref)
    mha = "fallback" if "bias_kv" in case else "rule"  # bias_k/bias_v are not projections: torch.func serves them
    for name, how in engine.describe().items():
        assert how == ("rule (Linear 'head')" if name.startswith("head") else f"{mha} (MultiheadAttention 'mha')")


@pytest.mark.parametrize("bias_kv", [False, True])
def test_multihead_attention_dropout_in_train_mode(bias_kv):
    """The rule takes the factors of the forward that ran, dropout included; the fallback, which
    would draw new dropout, refuses at the first call."""
    torch.manual_seed(13)
    model = Attending("none", False, batch_first=True, dropout=0.5, add_bias_kv=bias_kv).double().train()
    q = torch.randn(4, 5, 8, dtype=torch.float64)
    inputs, target = (q, q, q, torch.zeros(4, 5, dtype=torch.bool), None), torch.randint(0, 3, (4,))
    engine = ig.PerSampleGrads(model)
    if bias_kv:
        with pytest.raises(ig.UnsupportedModuleError, match=r"'mha' \(MultiheadAttention\): .*draws random numbers"):
            engine.norms(inputs, target, F.cross_entropy)
        return
    torch.manual_seed(14)
    _, per_param = engine.norms(inputs, target, F.cross_entropy, per_param=True)
    torch.manual_seed(14)  # the same dropout: MHA draws from torch's generator
    grads = engine(inputs, target, F.cross_entropy)
    for name, g in grads.items():
        torch.testing.assert_close(per_param[name], g.flatten(1).norm(dim=1), **F64, msg=name)
    # the summed gradient of a normal step with that dropout is the sum of the per-sample ones
    torch.manual_seed(14)
    model.zero_grad()
    F.cross_entropy(model(*inputs), target, reduction="sum").backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name].sum(0), p.grad, **F64, msg=name)


def test_multihead_attention_with_frozen_in_projection():
    """out_proj is used inside MHA's forward, never called: freezing in_proj leaves it served."""
    torch.manual_seed(7)
    model = Attending("none", False, batch_first=True).double()
    model.mha.in_proj_weight.requires_grad_(False)
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    inputs = (q, q, q, torch.zeros(3, 4, dtype=torch.bool), None)
    target = torch.randint(0, 3, (3,))
    ref = loop_module_grads(model, inputs, target, F.cross_entropy)
    assert "mha.in_proj_weight" not in ref and "mha.out_proj.weight" in ref
    check_all(model, inputs, target, F.cross_entropy, ref)


# ---------------------------------------------------------------- custom modules, shared and tied weights


class RawParams(nn.Module):
    """Owns raw parameters: a class token, a position table and a gain."""

    def __init__(self, d=6, t=5):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(t + 1, d))
        self.gain = nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return h * self.gain


class Gate(nn.Module):
    """No rule: served by the fallback, with a weight shared with a Linear."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, h):
        return h * torch.sigmoid(self.weight.sum(0))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.raw = RawParams()
        self.last = nn.Linear(6, 6)
        self.gate = Gate(self.last.weight)  # a fallback and a rule sharing one weight
        self.proj = nn.Linear(6, 6)
        self.twin = nn.Linear(6, 6)
        self.twin.weight = self.proj.weight  # two modules, one weight (biases apart)
        self.emb = nn.Embedding(10, 6)
        self.unembed = nn.Linear(6, 10, bias=False)
        self.unembed.weight = self.emb.weight  # an Embedding's table reused as a projection

    def forward(self, x, ids):
        h = self.raw(x + self.emb(ids))
        h = torch.tanh(self.proj(h)) + self.proj(h).flip(1)  # proj called twice
        h = self.last(self.gate(self.twin(h)))
        return self.unembed(h.mean(1))


def test_custom_module_with_raw_parameters_and_shared_weights(device):
    torch.manual_seed(8)
    model = Custom().double().to(device)
    x = torch.randn(5, 5, 6, dtype=torch.float64, device=device)
    ids = torch.randint(0, 10, (5, 5), device=device)
    target = torch.randint(0, 10, (5,), device=device)
    inputs = (x, ids)
    ref = func_module_grads(model, inputs, target, F.cross_entropy)
    engine = check_all(model, inputs, target, F.cross_entropy, ref)
    how = engine.describe()
    assert how["raw.cls"] == how["raw.gain"] == "fallback (RawParams 'raw')"
    assert how["proj.weight"] == "tied: rule (Linear 'proj') + rule (Linear 'twin')"
    assert how["emb.weight"] == "tied: rule (Embedding 'emb') + rule (Linear 'unembed')"
    assert how["last.weight"] == "tied: rule (Linear 'last') + fallback (Gate 'gate')"
    with pytest.raises(ig.UnsupportedModuleError, match=r"'raw' \(RawParams\): no per-sample gradient rule"):
        ig.PerSampleGrads(model, fallback=False)
    model.raw.requires_grad_(False)
    model.gate.requires_grad_(False)  # and last.weight with it
    ig.PerSampleGrads(model, fallback=False)  # frozen: fine


class Uncalled(nn.Module):
    """Uses its child's parameters without calling the child (as MHA uses out_proj)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x * self.scale, self.proj.weight, self.proj.bias)


class TiedByCode(nn.Module):
    """The output projection is the embedding's table, used by functional code."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids):
        return self.mix(self.emb(ids)).mean(1) @ self.emb.weight.t()


@pytest.mark.parametrize("generator", [False, True])
def test_parameters_used_outside_their_module_move_to_a_fallback(generator):
    """A parameter used outside its layers' calls is served by the fallback of the innermost
    module whose forward holds all its uses; the first call runs again, with the same draws."""
    torch.manual_seed(15)
    model = nn.Sequential(Uncalled(), nn.Dropout(0.3), nn.Linear(4, 3)).double()
    x, target = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    engine = ig.PerSampleGrads(model)
    g = torch.Generator().manual_seed(16) if generator else None
    torch.manual_seed(17)
    got = {k: v.clone() for k, v in engine(x, target, F.cross_entropy, generator=g).items()}  # replanned
    assert engine.describe()["0.proj.weight"] == "fallback (Uncalled '0')"
    g = torch.Generator().manual_seed(16) if generator else None
    torch.manual_seed(17)
    again = engine(x, target, F.cross_entropy, generator=g)  # planned: the same masks, the same results
    for name in got:
        torch.testing.assert_close(again[name], got[name], rtol=0, atol=0, msg=name)
    model.eval()
    check_all(model, x, target, F.cross_entropy, func_module_grads(model, x, target, F.cross_entropy))

    torch.manual_seed(18)
    tied = TiedByCode().double()
    ids, target = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    engine = check_all(tied, ids, target, F.cross_entropy, func_module_grads(tied, ids, target, F.cross_entropy))
    assert engine.describe()["emb.weight"] == "fallback (TiedByCode '(the model)')"
    assert engine.describe()["mix.weight"] == "rule (Linear 'mix')"

    def regularised(out, t):  # a use in the loss: no module holds it
        return F.cross_entropy(out, t) + tied.mix.weight.square().sum()

    with pytest.raises(ig.UnsupportedModuleError, match=r"\n  - parameter 'mix.weight' \(of 'mix', Linear\)"):
        ig.PerSampleGrads(tied).norms(ids, target, regularised)


class GainTiedToChild(nn.Module):
    """No rule: its own gain is its child's weight, which its forward also uses through the child."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gain = self.lin.weight

    def forward(self, x):
        return self.lin(x) * self.gain.sum(0)


def test_a_fallback_sharing_a_parameter_with_a_layer_below_it_counts_each_use_once():
    torch.manual_seed(19)
    model = nn.Sequential(GainTiedToChild(), nn.Linear(4, 3)).double()
    x, target = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    engine = check_all(model, x, target, F.cross_entropy, func_module_grads(model, x, target, F.cross_entropy))
    assert engine.describe()["0.gain"] == "fallback (GainTiedToChild '0')"  # lin.weight, named once
    assert engine.describe()["0.lin.bias"] == "rule (Linear '0.lin')"


class Mixing(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (x - x.mean(0)) * self.scale  # batch statistics


def test_what_the_fallback_cannot_serve_is_refused_by_name():
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ig.UnsupportedModuleError, match=r"'0' \(Mixing\): its output 0 computed sample by sample"):
        ig.PerSampleGrads(nn.Sequential(Mixing(), nn.Linear(3, 3))).norms(x, t, F.mse_loss)
    gru = nn.Sequential(nn.GRU(3, 3))  # seq-first: dim 0 of its output is not the batch
    with pytest.raises(ig.UnsupportedModuleError, match=r"'0' \(GRU\)"):
        ig.PerSampleGrads(gru).norms(torch.randn(4, 6, 3), None, lambda o: o[0].sum())
    both = nn.Sequential(Mixing(), nn.Linear(3, 3), Mixing())
    with pytest.raises(ig.UnsupportedModuleError, match=r"'2' \(Mixing\): (.|\n)*\n'0' \(Mixing\): "):
        ig.PerSampleGrads(both).norms(x, t, F.mse_loss)  # every one named, in the order their gradients came


# ---------------------------------------------------------------- precision, DP-SGD, LoRA


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_against_float64(dtype, kind):
    """Norms of the rounded model against float64 on it: tied GPT-2 (Conv1D, the cross term),
    Llama (its RMS norms, GQA)."""
    torch.manual_seed(9)
    model = (gpt2(True) if kind == "gpt2" else llama()).to(dtype)
    ids, mask = padded_ids(3, 8, 40, [8, 6, 4], seed=9)
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = loop_module_grads(copy.deepcopy(model).double(), inputs, ids, lm_loss)
    _, ref_norms = clipped_sum_ref(ref, 1.0)
    engine = ig.PerSampleGrads(model)
    norms, per_param = engine.norms(inputs, ids, lm_loss, per_param=True)
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(norms.double(), ref_norms, rtol=rel, atol=0)
    for name in ("transformer.wte.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        if name in ref:
            want = ref[name].flatten(1).norm(dim=1)
            torch.testing.assert_close(per_param[name].double(), want, rtol=rel * 2, atol=0, msg=name)


def test_dpsgd_step_on_tied_gpt2():
    torch.manual_seed(10)
    model = gpt2(True)
    ids, mask = padded_ids(4, 8, 50, [8, 5, 7, 3], seed=10)
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = loop_module_grads(model, inputs, ids, lm_loss)
    clip, sigma, lr, seed = 0.5, 0.7, 0.1, 11
    sums, norms = clipped_sum_ref(ref, clip)
    assert (norms < clip).any() or (norms > clip).any()
    want = {}
    for k, (name, p) in enumerate(model.named_parameters()):
        noise = noise_ref(p.shape, sigma * clip, seed, 0, k, p.dtype, p.device)
        want[name] = p.detach() - lr * (sums[name] + noise) / 4
    dp = DPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=4,
        seed=seed,
    )
    dp.step(inputs, ids, lm_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], **F64, msg=name)


def test_lora_adapters_with_peft():
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e .[bench])")
    torch.manual_seed(12)
    base = gpt2(False)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model = peft.get_peft_model(base, config)
    ids, mask = padded_ids(3, 8, 50, [8, 6, 5], seed=12)
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = loop_module_grads(model, inputs, ids, lm_loss)
    assert ref and all("lora_" in name for name in ref)
    check_all(model, inputs, ids, lm_loss, ref)
