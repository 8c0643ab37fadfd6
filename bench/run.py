"""End-to-end benchmark: per-sample gradients, norms and clipped sums of MLPs, small
transformers, Hugging Face models and CNNs, indivgrad_cuda beside plain autograd, a per-sample loop, the seed's bmm
method, torch.func, Opacus (hooks and ghost clipping) and BackPACK, each checked against a
float64 reference before it is timed.

    python bench/run.py                    # the headline setups: two of the seed's MLPs, a transformer, a CNN
    python bench/run.py --all              # the full sweep: every MLP, transformer, the residual MLP, both CNNs
    python bench/run.py --setups 32,300,50 tfm:32,64,128,2 --device cpu
    python bench/run.py --quick            # a small smoke run
    python bench/run.py --setups hf        # GPT-2, Llama and ViT shapes (Hugging Face), sized by device
    python bench/run.py --setups cnns      # Opacus's CIFAR-10 CNN and a WideResNet, sized by device

Setups:
  N,D,L           the seed's MLP: N samples, width D, L hidden Linear+ReLU layers, one logit,
                  mean BCE-with-logits loss (the seed's main.py); native capture
  tfm:N,T,D,L     a transformer encoder classifier (tests/models.py): token ids [N, T] with
                  padding and a mask, vocabulary 1000, d_model D, D/32 heads, L blocks, 10
                  classes, mean cross-entropy; hooks capture
  resmlp:N,D,L    a custom nn.Module MLP with residual connections and LayerNorm, width D,
                  L residual layers, one logit, BCE-with-logits; hooks capture
  gpt2:N,T,D,L,V  Hugging Face GPT2LMHeadModel from its config (no download): n_embd D, L
                  layers, D/64 heads, vocabulary V, T tokens, lm_head tied to wte; mean
                  next-token cross-entropy over the batch's tokens
  llama:N,T,D,L,V LlamaForCausalLM: hidden D, L layers, D/64 heads sharing D/256 (at least 1) key/value
                  heads (grouped-query attention), MLP 8D/3, vocabulary V; the same loss
  vit:N,S,D,L     ViTForImageClassification: S x S images, patch 16, hidden D, D/64 heads, L
                  layers, MLP 4D, 1000 classes, mean cross-entropy
  hf              the three above at the device's size (HF_SETUPS: full size on a GPU,
                  scaled down on a CPU); gpt2, llama or vit alone: that one at the device's size
  cnn:N,S         Opacus's CIFAR-10 example CNN (bench/cnn_models.py: four 3x3 convolutions,
                  average pooling, a linear head) on [N, 3, S, S] images, 10 classes, mean
                  cross-entropy; hooks capture
  wrn:N,S,D,K     WideResNet-D-K with GroupNorm (16 groups) for BatchNorm (De et al. 2022's
                  WRN-16-4 is wrn:N,32,16,4) on [N, 3, S, S] images, 10 classes, mean cross-entropy
  cnns            the two above at the device's size (CNN_SETUPS: full size on a GPU, scaled
                  down on a CPU); cnn or wrn alone: that one at the device's size
The default run (HEADLINE_SETUPS, `make bench`: about 2 minutes on 2 CPU cores) is the seed's
[32, 300, 50] and [1000, 100, 10], tfm:32,64,128,2 and cnn at the device's size; --all (`make
bench-all`) runs the seed's six MLPs, the three transformers, the residual MLP, cnn and wrn (and on
a GPU three larger MLPs). The Hugging Face setups are in neither (at full size they take minutes).
For per-sample gradients the table also gives "x bound": the time over the summed step plus
writing the gradients' bytes at the fill bandwidth measured in the same run; for the clipped sums
of the transformer setups (tfm, gpt2, llama, vit) the time over the FLOP bound of exact clipping
(bench/flop_bound.py: the summed step plus each layer's per-sample norm), also in the CSV's note.
Rows are appended to bench/results/results.csv.
"""

import argparse
import copy
import dataclasses
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
import torch.nn.functional as F
from torch import nn

import common
import console
from cnn_models import WideResNet, opacus_cifar_cnn
from flop_bound import flop_bound
from methods import METHODS, REFUSES_TIED, Skip, Task
from tests.models import ResidualMLP, TinyEncoder, token_batch
from tests.reference import clipped_sum_ref, func_module_grads

# The seed's MLPs; HEADLINE_SETUPS takes two of them, the deepest and the largest batch.
SEED_SETUPS = [
    ("mlp", s) for s in [(2, 3, 1), (10, 100, 10), (100, 100, 10), (100, 300, 3), (32, 300, 50), (1000, 100, 10)]
]
MODEL_SETUPS = [
    ("tfm", (32, 64, 128, 2)),
    ("tfm", (64, 128, 256, 4)),
    ("tfm", (16, 256, 512, 4)),
    ("resmlp", (256, 256, 4)),
]
GPU_SETUPS = [("mlp", s) for s in [(256, 1024, 4), (64, 4096, 2), (512, 300, 50)]]
# Hugging Face models built from their configs (no download; dropout 0; eval mode, and Opacus's
# copies in train mode, which without dropout computes the same), head dimension 64 throughout.
# kind -> {device type: dims}: full size on a GPU; on a CPU scaled down so that the three run
# in a few minutes on 2 cores (same architecture, kinds of layers, tying and GQA; fewer, narrower
# layers, a shorter sequence or smaller images, a smaller vocabulary).
HF_SETUPS = {
    # GPT-2 small: n_embd 768, 12 layers, 12 heads, vocabulary 50257, T 512, lm_head tied to wte.
    # Opacus's ghost clipping refuses tied weights: it gets an untied copy (lm_head a copy of
    # wte, the same forward, V x D more parameters), checked against that copy's reference.
    "gpt2": {"cuda": (8, 512, 768, 12, 50257), "cpu": (8, 64, 128, 2, 4096)},
    # Llama-shaped at GPT-2 small's scale: hidden 768, 12 layers, 12 query heads sharing 3
    # key/value heads, MLP 2048, vocabulary 32000, T 512, RMSNorm, rotary positions, untied head.
    # The CPU size has 2 query heads sharing 1 key/value head.
    "llama": {"cuda": (8, 512, 768, 12, 32000), "cpu": (8, 64, 128, 2, 4096)},
    # ViT-S/16: hidden 384, 6 heads, 12 layers, MLP 1536, patch 16, 224 x 224 images (197
    # tokens), 1000 classes. The CPU size: 96 x 96 images (37 tokens), hidden 128, 2 layers.
    "vit": {"cuda": (32, 224, 384, 12), "cpu": (8, 96, 128, 2)},
}
HEAD_DIM, VIT_PATCH, VIT_CLASSES = 64, 16, 1000
# The CNNs (bench/cnn_models.py), on CIFAR-shaped random images, 10 classes. kind -> {device
# type: dims}: full size on a GPU; on a CPU scaled down so that each runs in about a minute on 2
# cores with the default --budget-s (fewer samples; the WideResNet narrower).
CNN_SETUPS = {
    # Opacus's CIFAR-10 example CNN (0.13 M parameters) at batch 256 on 32 x 32 images; batch 64
    # on a CPU.
    "cnn": {"cuda": (256, 32), "cpu": (64, 32)},
    # WRN-16-4 (2.7 M parameters), De et al. 2022's CIFAR-10 model, GroupNorm of 16 groups, batch
    # 256. The CPU size: WRN-16-1 (0.18 M), batch 16.
    "wrn": {"cuda": (256, 32, 16, 4), "cpu": (16, 32, 16, 1)},
}
DEVICE_SIZED = {**HF_SETUPS, **CNN_SETUPS}  # the kinds that may be named alone: dims by device
GROUPS = {"hf": list(HF_SETUPS), "cnns": list(CNN_SETUPS)}  # the names of several such kinds
# The default run (`make bench`), about 2 minutes on 2 CPU cores with kernels.py's: the seed's
# deepest MLP and its largest batch, the smallest transformer and the CIFAR-10 CNN at the
# device's size. The transformers at T = 128 and 256 take minutes each on a CPU (their summed
# step alone 1.3 and 2.4 s): they are in ALL_SETUPS (`make bench-all`).
HEADLINE_SETUPS = [("mlp", (32, 300, 50)), ("mlp", (1000, 100, 10)), ("tfm", (32, 64, 128, 2)), ("cnn", None)]
ALL_SETUPS = SEED_SETUPS + MODEL_SETUPS + [("cnns", None)]  # --all; plus GPU_SETUPS on a GPU
QUICK_SETUPS = [("mlp", (2, 3, 1)), ("mlp", (16, 20, 3)), ("tfm", (4, 8, 32, 1)), ("resmlp", (8, 16, 2))]
KINDS = {
    "mlp": ("[N, D, L]", 3),
    "tfm": ("transformer [N, T, d_model, layers]", 4),
    "resmlp": ("residual MLP [N, D, L]", 3),
    "gpt2": ("GPT-2-shaped LM, lm_head tied to wte [N, T, n_embd, layers, vocab]", 5),
    "llama": ("Llama-shaped LM, grouped-query attention [N, T, hidden, layers, vocab]", 5),
    "vit": ("ViT-S/16-shaped classifier [N, image size, hidden, layers]", 4),
    "cnn": ("Opacus's CIFAR-10 example CNN [N, image size]", 2),
    "wrn": ("WideResNet with GroupNorm [N, image size, depth, width factor]", 4),
}
VOCAB, CLASSES = 1000, 10
WRITE = "(write)"  # timed beside the methods: a fill of the per-sample gradients' bytes
TOLERANCE = 1e-3  # relative error accepted in float32 (per sample, or of a batch-level result)
MAX_SAMPLES_OFF = 0.01  # the fraction of samples allowed past it (see samples_off)
LOOP_BUDGET_S = 2.0  # the per-sample loop is skipped when one run would take longer


def seed_mlp(d, hidden_layers):
    layers = []
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, d), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(d, 1))


def lm_loss(out, labels, reduction="mean"):
    """Next-token cross-entropy of a causal LM's logits: the mean over the batch's tokens, or
    (reduction="none") each sample's mean [N]; the same thing, every sample having T tokens."""
    logits = out.logits[:, :-1]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none")
    return losses.mean() if reduction == "mean" else losses.view(len(labels), -1).mean(1)


def logits_loss(out, labels, reduction="mean"):
    return F.cross_entropy(out.logits, labels, reduction=reduction)


def hf_task(kind, dims, device):
    """A Hugging Face model built from its config (see HF_SETUPS), random inputs and targets."""
    import transformers

    if kind == "vit":
        n, size, d, layers = dims
        cfg = transformers.ViTConfig(
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=d // HEAD_DIM,
            intermediate_size=4 * d,
            image_size=size,
            patch_size=VIT_PATCH,
            num_labels=VIT_CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.ViTForImageClassification(cfg)
        inputs = {"pixel_values": torch.randn(n, 3, size, size, device=device)}
        labels = torch.randint(0, VIT_CLASSES, (n,), device=device)
        return Task(
            model.eval().to(device), inputs, labels, logits_loss, functools.partial(logits_loss, reduction="none")
        )
    n, t, d, layers, vocab = dims
    heads, untied = d // HEAD_DIM, None
    ids = torch.randint(0, vocab, (n, t), device=device)
    if kind == "gpt2":
        model, untied = gpt2_pair(vocab, d, layers, heads, t)
        untied = untied.eval().to(device)
        # position ids given per sample: GPT-2 broadcasts its own [1, T], which Opacus's
        # Embedding rule reads as one sample (wrong wpe gradients in hooks mode, a failure in
        # ghost clipping); the engine and torch.func compute the same either way
        inputs = {"input_ids": ids, "position_ids": torch.arange(t, device=device).repeat(n, 1)}
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=HEAD_DIM * -(-8 * d // (3 * HEAD_DIM)),  # 8D/3 rounded up to 64: 2048 for 768
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            max_position_embeddings=t,
            attention_dropout=0.0,
        )
        model = transformers.LlamaForCausalLM(cfg)
        inputs = {"input_ids": ids}
    return Task(
        model.eval().to(device), inputs, ids, lm_loss, functools.partial(lm_loss, reduction="none"), untied=untied
    )


def gpt2_pair(vocab, d, layers, heads, t):
    """GPT2LMHeadModel from its config (no dropout; lm_head tied to wte), and its untied copy
    (the same values, lm_head a copy of wte) for the methods that refuse tied weights."""
    import transformers

    cfg = dict(
        vocab_size=vocab,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        n_positions=t,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    untied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, tie_word_embeddings=False))
    untied.load_state_dict(model.state_dict())  # lm_head.weight: a copy of wte's values
    return model, untied


def cnn_task(kind, dims, device):
    """Opacus's CIFAR-10 CNN or a WideResNet (see CNN_SETUPS): random images and labels, mean
    cross-entropy (an nn.Module, which BackPACK extends)."""
    n, size = dims[:2]
    model = opacus_cifar_cnn(CLASSES) if kind == "cnn" else WideResNet(dims[2], dims[3], CLASSES)
    x = torch.randn(n, 3, size, size, device=device)
    y = torch.randint(0, CLASSES, (n,), device=device)
    loss = nn.CrossEntropyLoss()
    return Task(model.to(device), (x,), y, loss, nn.CrossEntropyLoss(reduction="none"), backpack_loss=loss)


def make_task(setup, device):
    kind, dims = setup
    if kind in HF_SETUPS:
        return hf_task(kind, dims, device)
    if kind in CNN_SETUPS:
        return cnn_task(kind, dims, device)
    bce = nn.BCEWithLogitsLoss()
    if kind == "tfm":
        n, t, d, layers = dims
        model = TinyEncoder(vocab=VOCAB, d_model=d, heads=max(1, d // 32), layers=layers, max_len=t, classes=CLASSES)
        ids, mask, labels = token_batch(n, t, VOCAB, CLASSES)
        return Task(
            model.to(device),
            (ids.to(device), mask.to(device)),
            labels.to(device),
            F.cross_entropy,
            functools.partial(F.cross_entropy, reduction="none"),
        )
    n, d, depth = dims
    model = seed_mlp(d, depth) if kind == "mlp" else ResidualMLP(d, d, depth, 1)
    x = torch.randn(n, d, device=device)
    y = torch.randint(0, 2, (n, 1), device=device).float()
    mlp = kind == "mlp"
    return Task(
        model.to(device),
        (x,),
        y,
        bce,
        nn.BCEWithLogitsLoss(reduction="none"),
        mlp=mlp,
        backpack_loss=bce if mlp else None,
    )


def setup_name(setup):
    """The CSV's setup column: N x D x L for the seed's MLPs (as before), kind:dims otherwise."""
    kind, dims = setup
    dims = "x".join(map(str, dims))
    return dims if kind == "mlp" else f"{kind}:{dims}"


ZERO = 1e-6  # a parameter whose reference is below this fraction of the whole gradient's norm


def _relative(diff, ref, whole):
    """||diff|| / ||ref||, or / ||whole|| where ref is zero but for float64 rounding (ZERO):
    an attention key's bias, for one, has no gradient (softmax ignores a shift of all keys),
    and float32 rounding against 0 is no relative error."""
    return diff / torch.where(ref < ZERO * whole, whole, ref).clamp_min(1e-30)


def rel_err(got, ref):
    """Relative error (Frobenius) of a tensor, or the largest over a dict's entries (each
    against the whole's norm where its reference is zero up to rounding, see _relative)."""
    if isinstance(ref, dict):
        whole = torch.stack([v.double().norm() for v in ref.values()]).norm()
        return max(
            _relative((got[k].double() - v.double()).norm(), v.double().norm(), whole).item() for k, v in ref.items()
        )
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def samples_off(got, ref):
    """How many samples' per-sample gradients are off by more than TOLERANCE (relative).
    A float32 forward can put a pre-activation that float64 sees just above 0 just below
    it, which changes that one sample's gradient: a rounding effect, not a wrong method,
    as long as it stays rare."""
    norms = {k: r.flatten(1).norm(dim=1) for k, r in ref.items()}
    whole = torch.stack(list(norms.values())).norm(dim=0)
    err = torch.stack(
        [_relative((got[k].double() - r).flatten(1).norm(dim=1), norms[k], whole) for k, r in ref.items()]
    ).amax(0)
    return int((err > TOLERANCE).sum())


def check(result, ref, kind):
    """(max relative error, note): the note starts with WRONG when the result is not accepted."""
    err = rel_err(result, ref)
    if kind == "grads":
        off, n = samples_off(result, ref), len(next(iter(ref.values())))
        if off > MAX_SAMPLES_OFF * n:
            return err, f"WRONG: {off} of {n} samples off by more than {TOLERANCE}"
        return err, f"{off} of {n} samples off by more than {TOLERANCE} (float32 at a ReLU kink)" if off else ""
    return err, (f"WRONG: relative error {err:.2e} > {TOLERANCE}" if err > TOLERANCE else "")


def references(task, max_norm=None):
    """float64 per-sample gradients (torch.func; a per-sample loop of autograd where
    torch.func cannot run the model), their mean, norms and a clipped sum whose max_norm
    (the median norm, unless given) clips about half the samples."""
    m64 = copy.deepcopy(task.model).double()

    def f64(t):
        return t.double() if t.is_floating_point() else t

    if isinstance(task.inputs, dict):
        inputs64 = {k: f64(t) for k, t in task.inputs.items()}
    else:
        inputs64 = tuple(f64(t) for t in task.inputs)
    try:
        grads = func_module_grads(m64, inputs64, f64(task.target), task.loss)
    except RuntimeError:  # torch.func's refusals (data-dependent control flow ...)
        task64 = dataclasses.replace(task, model=m64, inputs=inputs64, target=f64(task.target))
        grads = METHODS["loop"][0](task64)()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    max_norm = norms.median().item() if max_norm is None else max_norm
    clipped, _ = clipped_sum_ref(grads, max_norm)
    refs = {"grads": grads, "mean_grad": {k: g.mean(0) for k, g in grads.items()}, "norms": norms, "clipped": clipped}
    return refs, max_norm


def write_gradients(task, device):
    """A fill of a buffer of the per-sample gradients' bytes: writing them, at best."""
    numel = task.n * sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    buf = torch.empty(numel, device=device)
    return lambda: buf.fill_(1.0)


def bench_setup(setup, device, methods, progress, budget_s=1.0):
    torch.manual_seed(0)
    task = make_task(setup, device)
    refs, max_norm = references(task)
    rows, summed_ms, n = [], None, task.n
    untied_refs = None  # the untied copy's references, for the methods that refuse tied weights
    timed = {}  # name -> (fn, kind, row): the methods whose results were right, timed together below
    for name in methods:
        factory, kind = METHODS[name]
        progress(f"{setup_name(setup)} {name}")
        row = {"setup": setup_name(setup), "method": name}
        rows.append(row)
        try:
            fn = factory(task, max_norm=max_norm)
        except Skip as e:
            row["note"] = f"skipped: {e}"
            continue
        method_refs, untied_note = refs, ""
        if name in REFUSES_TIED and task.untied is not None:
            if untied_refs is None:
                untied_refs, _ = references(dataclasses.replace(task, model=task.untied), max_norm)
            method_refs, untied_note = untied_refs, "on an untied copy (refuses tied weights)"
        if name == "loop" and summed_ms is not None and summed_ms * n / 1e3 > LOOP_BUDGET_S:
            row["note"] = f"skipped: about {summed_ms * n / 1e3:.0f} s a run"
            continue
        try:
            first_ms, result = first_call(fn)
        except Skip as e:  # torch.func found what it cannot run
            row["note"] = f"skipped: {e}"
            continue
        except Exception as e:  # a competitor's failure is a row, not the end of the bench
            if name.startswith("indivgrad"):
                raise
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        if name == "summed":
            summed_ms = first_ms  # only to skip a loop that would take too long
        row["max_rel_err"], row["note"] = check(result, method_refs[kind], kind)
        row["note"] = "; ".join(filter(None, [row["note"], untied_note]))
        if not row["note"].startswith("WRONG"):
            timed[name] = (fn, kind, row)
    progress(f"{setup_name(setup)}: timing {len(timed)} methods in turn")
    medians = common.time_interleaved(
        {WRITE: write_gradients(task, device), **{name: fn for name, (fn, _, _) in timed.items()}},
        device,
        warmup=1,
        budget_s=budget_s,
    )
    summed_ms, bound_write_ms = medians.get("summed"), medians[WRITE]
    for name, (_, kind, row) in timed.items():
        row["median_ms"] = medians[name]
        # a fresh instance, so lazily allocated state (indivgrad's reused buffers) is counted
        row["peak_mem_mb"] = common.peak_memory_mb(METHODS[name][0](task, max_norm=max_norm), device)
        row["ratio_vs_summed"] = row["median_ms"] / summed_ms if summed_ms else None
        if kind == "grads" and summed_ms:  # % of the bound: the summed step plus writing the gradients
            row["roofline_pct"] = 100 * (summed_ms + bound_write_ms) / row["median_ms"]
    add_flop_bound(setup, task, rows)
    return rows


# The transformer setups, whose clipped sums are judged against the FLOP bound of exact
# per-sample clipping (bench/flop_bound.py): the summed step plus each layer's norm, the cheaper
# of its ghost and direct forms. It goes in the note (the CSV's columns stay as they are) and in
# the table's "x bound" column of the clipped rows.
FLOP_BOUND_KINDS = {"tfm", "gpt2", "llama", "vit"}


def add_flop_bound(setup, task, rows):
    """On a transformer setup, each timed clipped sum's time over the FLOP bound's: its ratio to
    the summed step divided by the bound (row["flop_bound"], row["x_flop_bound"]; the note)."""
    if setup[0] not in FLOP_BOUND_KINDS:
        return
    bound = flop_bound(task.model, task.inputs)
    for row in rows:
        if METHODS[row["method"]][1] == "clipped" and row.get("ratio_vs_summed"):
            row["flop_bound"], row["x_flop_bound"] = bound, row["ratio_vs_summed"] / bound
            note = f"{row['x_flop_bound']:.3g}x the FLOP bound ({bound:.3f}x summed)"
            row["note"] = "; ".join(filter(None, [row.get("note"), note]))


def first_call(fn):
    """(wall ms, result) of a first call, whose result is checked before any timing."""
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1e3, result


def print_table(setup, setup_rows):
    kind, dims = setup
    print(f"\n{KINDS[kind][0]} = {list(dims)}")
    print(f"  {'method':<18} {'median ms':>10} {'x summed':>9} {'x bound':>8} {'peak MB':>9} {'rel err':>9}  note")
    for r in setup_rows:
        bound = 100 / r["roofline_pct"] if r.get("roofline_pct") else r.get("x_flop_bound")
        print(
            f"  {r['method']:<18} {common.fmt(r.get('median_ms')):>10} {common.fmt(r.get('ratio_vs_summed')):>9} "
            f"{common.fmt(bound):>8} {common.fmt(r.get('peak_mem_mb')):>9} {common.fmt(r.get('max_rel_err'), 2):>9}  "
            f"{r.get('note', '')}"
        )
    flop = next((r["flop_bound"] for r in setup_rows if r.get("flop_bound")), None)
    if flop:
        print(f"  x bound of the clipped sums: time over the FLOP bound of exact clipping, {flop:.3f}x the summed step")


def parse_setup(text):
    """(kind, dims); a Hugging Face or CNN kind alone (or "hf", "cnns": a group of them) gets
    dims None: the device's size from HF_SETUPS or CNN_SETUPS, filled in by device_setups."""
    if text in GROUPS or text in DEVICE_SIZED:
        return text, None
    kind, _, dims = text.rpartition(":")
    kind = kind or "mlp"
    try:
        parts = tuple(int(v) for v in dims.split(","))
    except ValueError:
        parts = ()
    if kind not in KINDS or len(parts) != KINDS[kind][1] or min(parts, default=0) < 1:
        raise argparse.ArgumentTypeError(
            "a setup is N,D,L, tfm:N,T,D,L, resmlp:N,D,L, gpt2:N,T,D,L,V, llama:N,T,D,L,V, vit:N,S,D,L, cnn:N,S or "
            f"wrn:N,S,D,K with positive integers, or hf, gpt2, llama, vit, cnns, cnn, wrn alone; got {text!r}"
        )
    if kind == "wrn" and (parts[2] < 10 or (parts[2] - 4) % 6):
        raise argparse.ArgumentTypeError(f"a WideResNet's depth D is 6n + 4 (10, 16, 22, 28 ...); got {text!r}")
    if kind == "cnn" and parts[1] < 8:  # it pools three times by 2 before its adaptive pooling
        raise argparse.ArgumentTypeError(f"the CNN's images are at least 8 x 8; got {text!r}")
    return kind, parts


def device_setups(setups, device):
    """The setups with each Hugging Face or CNN kind given alone (or by its group, hf or cnns)
    sized for the device (HF_SETUPS, CNN_SETUPS)."""
    size = "cuda" if device.type == "cuda" else "cpu"
    out = []
    for kind, dims in setups:
        kinds = GROUPS.get(kind, [kind])
        out += [(k, DEVICE_SIZED[k][size] if dims is None else dims) for k in kinds]
    return out


def chosen_setups(args, device):
    """The setups to run, sized for the device: --setups, else --quick's, --all's or the headline ones."""
    if args.setups:
        setups = args.setups
    elif args.quick:
        setups = QUICK_SETUPS
    elif args.all:
        setups = ALL_SETUPS + (GPU_SETUPS if device.type == "cuda" else [])
    else:
        setups = HEADLINE_SETUPS
    return device_setups(setups, device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--setups",
        nargs="+",
        type=parse_setup,
        help="N,D,L | tfm:N,T,D,L | resmlp:N,D,L | gpt2:N,T,D,L,V | llama:N,T,D,L,V | vit:N,S,D,L | cnn:N,S | "
        "wrn:N,S,D,K | hf | gpt2 | llama | vit | cnns | cnn | wrn (default: the headline setups 32,300,50 "
        "1000,100,10 tfm:32,64,128,2 cnn)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="four small setups, for smoke tests")
    parser.add_argument(
        "--all",
        action="store_true",
        help="the full sweep: the seed's six MLPs, three transformers, the residual MLP, cnn and wrn "
        "(plus three larger MLPs on a GPU)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=1.0,
        help="seconds of timing per method and setup, at least 5 rounds (default 1; the smoke tests use less)",
    )
    parser.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--no-plot", action="store_true")
    console.add_quiet_flag(parser)
    args = parser.parse_args(argv)
    if sum(map(bool, (args.setups, args.quick, args.all))) > 1:
        parser.error("--setups, --quick and --all each choose the setups: give one")
    console.silence_peer_warnings()
    device = torch.device(args.device)
    setups = chosen_setups(args, device)
    if "summed" not in args.methods:
        args.methods = ["summed", *args.methods]  # every ratio is to the summed gradient
    context = common.run_context(device)
    print(f"bench/run.py on {context['device']}, torch {context['torch']}, commit {context['commit']}")

    # a step per method and setup, and one for timing each setup's methods together
    progress = console.Progress(len(setups) * (len(args.methods) + 1), args.quiet)
    all_rows = []
    for setup in setups:
        rows = bench_setup(setup, device, args.methods, progress.start, args.budget_s)
        with progress.paused():
            print_table(setup, rows)
        rows = [{**context, "bench": "run", **r} for r in rows]
        path = common.append_rows(rows, args.results_dir)  # at once: a run stopped early keeps what it measured
        all_rows += rows
    progress.close()
    skipped = sorted({f"{r['method']} ({r['note'][9:]})" for r in all_rows if r.get("note", "").startswith("skipped")})
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    print(f"\n{len(all_rows)} rows appended to {path}")
    if not args.no_plot:
        import plot

        for png in plot.plot_latest(path, "run"):
            print(f"plot: {png}")
    wrong = [r for r in all_rows if r.get("note", "").startswith("WRONG")]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
