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


def norms_ref(x, g):
    """(weight, bias) squared per-sample norms in float64, by forming each gradient."""
    x, g = x.double(), g.double()
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    return torch.einsum("nti,nto->nio", x, g).square().sum((1, 2)), g.sum(1).square().sum(1)


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (5, 1, 7, 2), (5, None, 7, 2), (3, 40, 33, 20), (0, 3, 2, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_layer_sq_norms(device, dtype, shape, flags):
    n, t, d_in, d_out = shape
    lead = (n,) if t is None else (n, t)  # None: a 2-D pair [N, D]
    x = torch.randn(*lead, d_in, dtype=dtype, device=device)
    g = torch.randn(*lead, d_out, dtype=dtype, device=device)
    weight, bias = flags
    rows = [r for r, want in zip(norms_ref(x, g), flags) if want]
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for method in ("ghost", "direct", "auto"):
        got = ops.linear_layer_sq_norms(x, g, method=method, weight=weight, bias=bias)
        assert got.shape == (len(rows), n) and got.dtype == acc
        buffer = torch.full((4, n), 7.0, dtype=acc, device=device)  # out as rows 1.. of a bigger buffer
        assert (
            ops.linear_layer_sq_norms(x, g, method=method, weight=weight, bias=bias, out=buffer[1 : 1 + len(rows)])
            is not None
        )
        for i, ref in enumerate(rows):
            torch.testing.assert_close(got[i].double(), ref, **NORM_TOL[dtype], msg=method)
            torch.testing.assert_close(buffer[1 + i].double(), ref, **NORM_TOL[dtype], msg=method)
        assert (buffer[0] == 7).all() and (buffer[1 + len(rows) :] == 7).all()


# Shapes where the fused forms' tiles have remainders (CPU: 512 KiB per step): ghost tiles of
# 129 positions for T = 513 (129, 129, 129, 126), blocks of 6 samples of T = 100 for N = 13;
# direct slabs of 64 rows of a [100, 2048] gradient, blocks of 8 samples of [128, 128] for N = 19;
# and N = 0, T = 1, T = 0, and sizes below and above the plain-loop threshold (2^15 multiply-adds).
@pytest.mark.parametrize(
    "shape",
    [
        (3, 513, 9, 5),
        (13, 100, 12, 8),
        (3, 2, 2048, 100),
        (19, 3, 128, 128),
        (0, 4, 3, 3),
        (7, 1, 300, 200),
        (4, 0, 3, 3),
        (2, 6, 4, 3),
        (2, 70, 40, 30),
    ],
)
@pytest.mark.parametrize("method", ["ghost", "direct"])
def test_fused_norm_forms(device, method, shape):
    n, t, d_in, d_out = shape
    x = torch.randn(n, t, d_in, device=device)
    g = torch.randn(n, t, d_out, device=device)
    weight_ref, bias_ref = norms_ref(x, g)
    torch.testing.assert_close(ops.linear_sq_norms(x, g, method=method).double(), weight_ref, rtol=2e-5, atol=1e-6)
    got = ops.linear_layer_sq_norms(x.double(), g.double(), method=method)
    torch.testing.assert_close(got, torch.stack([weight_ref, bias_ref]), **TOL[torch.float64])
    # strided inputs (a transposed view): the same numbers
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(ops.linear_sq_norms(xt, g, method=method).double(), weight_ref, rtol=2e-5, atol=1e-6)


def layer_norm_norms_ref(x, g, normalized):
    xhat = F.layer_norm(x.double(), normalized, eps=1e-5)
    middle = tuple(range(1, x.dim() - len(normalized)))
    w, b = xhat * g.double(), g.double()
    if middle:
        w, b = w.sum(middle), b.sum(middle)
    return w.flatten(1).square().sum(1), b.flatten(1).square().sum(1)


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(
    "shape,normalized",
    [
        ((4, 6), (6,)),
        ((4, 1, 6), (6,)),
        ((4, 3, 6), (6,)),
        ((4, 2, 3, 2, 5), (2, 5)),
        ((0, 3, 6), (6,)),
        ((3, 100, 128), (128,)),
        ((3, 1, 12000), (12000,)),
        ((2, 3, 0), (0,)),
    ],  # beyond the plain loops' 2^15 elements
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_sq_norms(device, dtype, shape, normalized, flags):
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 1
    g = torch.randn(shape, dtype=dtype, device=device)
    rows = [r for r, want in zip(layer_norm_norms_ref(x, g, normalized), flags) if want]
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    got = ops.layer_norm_sq_norms(x, g, normalized, 1e-5, weight=flags[0], bias=flags[1])
    assert got.shape == (len(rows), shape[0]) and got.dtype == acc
    buffer = torch.full((5, shape[0]), 7.0, dtype=acc, device=device)
    ops.layer_norm_sq_norms(x, g, normalized, 1e-5, weight=flags[0], bias=flags[1], out=buffer[2 : 2 + len(rows)])
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for i, ref in enumerate(rows):
        torch.testing.assert_close(got[i].double(), ref, **tol)
        torch.testing.assert_close(buffer[2 + i].double(), ref, **tol)
    assert (buffer[:2] == 7).all() and (buffer[2 + len(rows) :] == 7).all()


def test_the_cost_rule():
    assert ops.linear_norm_uses_ghost(1, 10, 10)
    # c = 16 (the fused forms' temporaries stay in cache): T²(D_in + D_out + 2c) <= (T + c)·D_in·D_out
    assert ops.linear_norm_uses_ghost(69, 128, 128)  # 69²·288 = 1.371M <= 85·128² = 1.393M
    assert not ops.linear_norm_uses_ghost(70, 128, 128)  # 70²·288 = 1.411M > 86·128² = 1.409M
    assert ops.linear_norm_uses_ghost(214, 256, 1024) and not ops.linear_norm_uses_ghost(215, 256, 1024)
    assert ops.linear_norm_uses_ghost(256, 768, 768) and not ops.linear_norm_uses_ghost(1024, 768, 768)
    assert ops.linear_norm_uses_ghost(2048, 4096, 4096)
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
        (torch.ops.indivgrad_cuda.linear_layer_sq_norms, (x, g, "ghost", True, True, torch.empty(2, 3, device=device))),
        (
            torch.ops.indivgrad_cuda.linear_layer_sq_norms,
            (x, g, "direct", True, False, torch.empty(1, 3, device=device)),
        ),
        (
            torch.ops.indivgrad_cuda.linear_layer_sq_norms,
            (x[:, 0], g[:, 0], "auto", False, True, torch.empty(1, 3, device=device)),
        ),
        (
            torch.ops.indivgrad_cuda.layer_norm_sq_norms,
            (x, torch.randn_like(x), [5], 1e-5, True, True, torch.empty(2, 3, device=device)),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_call():
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    fn = torch.compile(
        lambda a, b: ops.linear_sq_norms(a, b) + ops.seq_outer(a, b).sum((1, 2)), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(x, g), ops.linear_sq_norms(x, g) + ops.seq_outer(x, g).sum((1, 2)))

    def layer(a, b):
        out = torch.empty(3, 3)
        ops.linear_layer_sq_norms(a, b, out=out[:2])
        ops.layer_norm_sq_norms(a, a, [5], 1e-5, bias=False, out=out[2:])
        return out

    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x, g), layer(x, g))


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
    ln = ops.layer_norm_sq_norms
    cases += [
        (
            ValueError,
            r"out: expected shape \[2, 3\] \(a row of N .*weight, bias\), got \[1, 3\]",
            ops.linear_layer_sq_norms,
            (x, g),
            dict(out=torch.empty(1, 3)),
        ),
        (
            ValueError,
            r"out: expected shape \[1, 3\] .*got \[2, 3\]",
            ops.linear_layer_sq_norms,
            (x, g),
            dict(bias=False, out=torch.empty(2, 3)),
        ),
        (
            TypeError,
            r"out: expected dtype Float \(the accumulation dtype of Half inputs\), got Half",
            ops.linear_layer_sq_norms,
            (x.half(), g.half()),
            dict(out=torch.empty(2, 3).half()),
        ),
        (
            ValueError,
            r"out: expected contiguous rows \(stride 1 along N\), got strides \[1, 2\]",
            ops.linear_layer_sq_norms,
            (x, g),
            dict(out=torch.empty(3, 2).t()),
        ),
        (
            ValueError,
            r"out: must not share memory with g",
            ops.linear_layer_sq_norms,
            (x, shared[:24].view(3, 4, 2)),
            dict(out=shared[20:26].view(2, 3)),
        ),
        (
            ValueError,
            r"g: expected leading dims \[3, 4\] \(x's\), got shape \[3, 3, 2\]",
            ops.linear_layer_sq_norms,
            (x, g[:, :3]),
        ),
        (TypeError, r"g: expected dtype Float \(x's dtype\), got Double", ops.linear_layer_sq_norms, (x, g.double())),
        (
            ValueError,
            r"x: expected \[N, D_in\] or \[N, T, D_in\], got shape \[3\]",
            ops.linear_layer_sq_norms,
            (x[:, 0, 0], g[:, 0, 0]),
        ),
        (
            ValueError,
            r"method: expected \"auto\", \"ghost\" or \"direct\", got \"fast\"",
            ops.linear_layer_sq_norms,
            (x, g),
            dict(method="fast"),
        ),
        (ValueError, r"x: expected \[N, \*, \[4\]\] .*got shape \[3, 4, 5\]", ln, (x, x, [4], 1e-5)),
        (ValueError, r"g: expected shape \[3, 4, 5\] \(x's shape\), got \[3, 4, 2\]", ln, (x, g, [5], 1e-5)),
        (TypeError, r"g: expected dtype Float \(x's dtype\), got Double", ln, (x, x.double(), [5], 1e-5)),
        (
            TypeError,
            r"out: expected dtype Double .*got Float",
            ln,
            (x.double(), x.double(), [5], 1e-5),
            dict(out=torch.empty(2, 3)),
        ),
        (ValueError, r"out: expected shape \[1, 3\]", ln, (x, x, [5], 1e-5), dict(weight=False, out=torch.empty(2, 3))),
    ]
    for exc, pattern, fn, args, *kw in cases:
        with pytest.raises(exc, match=pattern):
            fn(*args, **(kw[0] if kw else {}))


def test_engine_exports_the_layer_ops():
    assert ig.ops.seq_outer is ops.seq_outer and "auto" in ig.ops.NORM_METHODS
