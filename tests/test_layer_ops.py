"""The layer rules' ops (csrc/layer_ops.cpp) against plain float64 references: per-sample
gradients over sequences, ghost and direct squared norms, Embedding and LayerNorm; opcheck;
and their errors."""

import pytest
import torch
import torch.nn.functional as F

import indivgrad_cuda as ig
from indivgrad_cuda import ops
from tests.conftest import DTYPES, TOL

# Squared norms against float64 from the same rounded inputs: half types accumulate in float32,
# so their error is float32's (measured up to 5e-7), not their own rounding's.
NORM_TOL = {
    torch.float64: TOL[torch.float64],
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-6),
}


def seq_ref(x, g, layout):
    x, g = x.double(), g.double()
    return torch.einsum("nti,nto->nio" if layout == "in_out" else "nti,nto->noi", x, g)


def embedding_ref(ids, g, v, padding_idx):
    out = torch.zeros(ids.shape[0], v, g.shape[-1], dtype=torch.float64, device=g.device)
    for n in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[n, t] != padding_idx:
                out[n, ids[n, t]] += g[n, t].double()
    return out


@pytest.mark.parametrize("t", [0, 1, 2, 7])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_seq_outer(device, dtype, layout, t):
    x = torch.randn(5, t, 6, dtype=dtype, device=device)
    g = torch.randn(5, t, 4, dtype=dtype, device=device)
    tol = TOL[dtype] if t <= 1 else dict(rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 4)  # T terms
    torch.testing.assert_close(ops.seq_outer(x, g, layout=layout).double(), seq_ref(x, g, layout), **tol)
    out = torch.full((5, 6, 4) if layout == "in_out" else (5, 4, 6), 7.0, dtype=dtype, device=device)
    assert ops.seq_outer(x, g, layout=layout, out=out) is out
    torch.testing.assert_close(out.double(), seq_ref(x, g, layout), **tol)


@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
@pytest.mark.parametrize("shape", [(6, 1, 5, 3), (6, 4, 5, 3), (3, 9, 2, 2), (4, 3, 0, 3), (0, 3, 2, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_sq_norms(device, dtype, shape, method):
    n, t, d_in, d_out = shape
    x = torch.randn(n, t, d_in, dtype=dtype, device=device)
    g = torch.randn(n, t, d_out, dtype=dtype, device=device)
    got = ops.linear_sq_norms(x, g, method=method)
    assert got.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    torch.testing.assert_close(got.double(), seq_ref(x, g, "in_out").square().sum((1, 2)), **NORM_TOL[dtype])
    if t == 1:  # a 2-D pair is T = 1
        torch.testing.assert_close(ops.linear_sq_norms(x[:, 0], g[:, 0], method=method), got)


def test_sq_norms_over_several_blocks_of_samples():
    # 16 MiB of [D_out, D_in] gradient per sample: the direct form runs 4 samples per block
    x, g = torch.randn(9, 2, 2048), torch.randn(9, 2, 2048)
    ref = seq_ref(x, g, "in_out").square().sum((1, 2))
    torch.testing.assert_close(ops.linear_sq_norms(x, g, method="direct").double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.linear_sq_norms(x, g, method="ghost").double(), ref, rtol=1e-5, atol=0)


def test_the_cost_rule():
    assert ops.linear_norm_uses_ghost(1, 10, 10)
    assert ops.linear_norm_uses_ghost(81, 128, 128)  # 81²(128 + 128 + 256) = 3.36M <= (81 + 128)·128² = 3.42M
    assert not ops.linear_norm_uses_ghost(82, 128, 128)
    assert not ops.linear_norm_uses_ghost(512, 768, 768)  # long sequences: direct
    assert ops.linear_norm_uses_ghost(512, 4096, 4096)
    assert ig._C.embedding_norm_uses_ghost(64, "auto") and not ig._C.embedding_norm_uses_ghost(65, "auto")


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_ops(device, dtype, padding_idx):
    ids = torch.randint(0, 6, (4, 11), device=device)
    ids[0, :3] = 3  # repeated tokens, and the padding id when it is 3
    g = torch.randn(4, 11, 5, dtype=dtype, device=device)
    g[1, ids[1] == 0] = float("nan") if padding_idx == 0 else 1.0  # padding rows: no gradient, NaN or not
    ref = embedding_ref(ids, g, 6, padding_idx)
    tol = dict(rtol=TOL[dtype]["rtol"] * 8, atol=TOL[dtype]["atol"] * 8)
    got = ops.embedding_grads(ids, g, 6, padding_idx)
    assert got.dtype == dtype and got.shape == (4, 6, 5)
    torch.testing.assert_close(got.double(), ref, **tol)
    out = torch.full((4, 6, 5), 9.0, dtype=dtype, device=device)
    ops.embedding_grads(ids.int(), g, 6, padding_idx, out=out)
    torch.testing.assert_close(out.double(), ref, **tol)
    for method in ("ghost", "direct", "auto"):
        norms = ops.embedding_sq_norms(ids, g, padding_idx, method=method)
        torch.testing.assert_close(norms.double(), ref.square().sum((1, 2)), **NORM_TOL[dtype], msg=method)


@pytest.mark.parametrize("shape,normalized", [((4, 6), (6,)), ((4, 3, 6), (6,)), ((4, 2, 3, 2, 5), (2, 5))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_grads(device, dtype, shape, normalized):
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 1
    g = torch.randn(shape, dtype=dtype, device=device)
    gw, gb = ops.layer_norm_grads(x, g, normalized, 1e-5)
    xhat = F.layer_norm(x.double(), normalized, eps=1e-5)
    middle = tuple(range(1, x.dim() - len(normalized)))
    ref_w, ref_b = (xhat * g.double()), g.double()
    if middle:
        ref_w, ref_b = ref_w.sum(middle), ref_b.sum(middle)
    tol = dict(rtol=TOL[dtype]["rtol"] * 8, atol=TOL[dtype]["atol"] * 8 + (1e-2 if dtype == torch.bfloat16 else 0))
    assert gw.dtype == gb.dtype == dtype and gw.shape == (shape[0], *normalized)
    torch.testing.assert_close(gw.double(), ref_w, **tol)
    torch.testing.assert_close(gb.double(), ref_b, **tol)


def test_opcheck(device):
    x, g = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 2, device=device)
    ids = torch.randint(0, 6, (3, 4), device=device)
    cases = [
        (torch.ops.indivgrad_cuda.seq_outer, (x, g, "out_in")),
        (torch.ops.indivgrad_cuda.seq_outer_out, (x, g, "in_out", torch.empty(3, 5, 2, device=device))),
        (torch.ops.indivgrad_cuda.linear_sq_norms, (x, g, "ghost")),
        (torch.ops.indivgrad_cuda.linear_sq_norms, (x, g, "direct")),
        (torch.ops.indivgrad_cuda.embedding_grads, (ids, g, 6, 0)),
        (torch.ops.indivgrad_cuda.embedding_grads_out, (ids, g, None, torch.empty(3, 6, 2, device=device))),
        (torch.ops.indivgrad_cuda.embedding_sq_norms, (ids, g, 0, "ghost")),
        (torch.ops.indivgrad_cuda.embedding_sq_norms, (ids, g, None, "direct")),
        (torch.ops.indivgrad_cuda.layer_norm_grads, (x, g.new_ones(3, 4, 5), [5], 1e-5)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_call():
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    fn = torch.compile(
        lambda a, b: ops.linear_sq_norms(a, b) + ops.seq_outer(a, b).sum((1, 2)), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(x, g), ops.linear_sq_norms(x, g) + ops.seq_outer(x, g).sum((1, 2)))


def test_errors():
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    ids = torch.randint(0, 6, (3, 4))
    shared = torch.zeros(200)
    cases = [
        (ValueError, r"x: expected a 3-D tensor \[N, T, D_in\], got shape \[3, 5\]", ops.seq_outer, (x[:, 0], g)),
        (ValueError, r"g: expected leading dims \[3, 4\] \(x's\), got shape \[3, 3, 2\]", ops.seq_outer, (x, g[:, :3])),
        (TypeError, r"g: expected dtype Float \(x's dtype\), got Double", ops.linear_sq_norms, (x, g.double())),
        (
            TypeError,
            r"x: expected dtype float32, float64, float16 or bfloat16, got Long",
            ops.linear_sq_norms,
            (ids[..., None], ids[..., None]),
        ),
        (
            ValueError,
            r"g: expected 3 dims like x \(\[N, T, D_out\]\), got shape \[3, 2\]",
            ops.linear_sq_norms,
            (x, g[:, 0]),
        ),
        (
            ValueError,
            r"method: expected \"auto\", \"ghost\" or \"direct\", got \"fast\"",
            ops.linear_sq_norms,
            (x, g),
            dict(method="fast"),
        ),
        (ValueError, r"ids: expected a 2-D tensor \[N, T\], got shape \[3\]", ops.embedding_grads, (ids[:, 0], g, 6)),
        (TypeError, r"ids: expected dtype int64 or int32, got Float", ops.embedding_grads, (ids.float(), g, 6)),
        (ValueError, r"g: expected \[3, 4, D\] .*got shape \[3, 3, 2\]", ops.embedding_sq_norms, (ids, g[:, :3])),
        (
            ValueError,
            r"out: expected shape \[3, 6, 2\], got \[3, 6, 3\]",
            ops.embedding_grads,
            (ids, g, 6),
            dict(out=torch.empty(3, 6, 3)),
        ),
        (
            ValueError,
            r"out: must not share memory with x",
            ops.seq_outer,
            (shared[:60].view(3, 4, 5), x),
            dict(out=shared[50:125].view(3, 5, 5)),
        ),
        (ValueError, r"x: expected \[N, \*, \[4\]\] .*got shape \[3, 4, 5\]", ops.layer_norm_grads, (x, x, [4], 1e-5)),
        (
            ValueError,
            r"g: expected shape \[3, 4, 5\] \(x's shape\), got \[3, 4, 2\]",
            ops.layer_norm_grads,
            (x, g, [5], 1e-5),
        ),
    ]
    for exc, pattern, fn, args, *kw in cases:
        with pytest.raises(exc, match=pattern):
            fn(*args, **(kw[0] if kw else {}))


def test_engine_exports_the_layer_ops():
    assert ig.ops.seq_outer is ops.seq_outer and "auto" in ig.ops.NORM_METHODS
