"""The inner-product ops (linear_gram, embedding_gram) against per-sample gradients formed in
float64: 2-D and sequence factors, the Gram and direct forms, bias 0 and 1, every dtype,
empty sets, blocks, padding, the cost rule, bad arguments, opcheck and torch.compile."""

import pytest
import torch

from indivgrad_cuda import ops
from tests.conftest import DTYPES, TOL


def linear_grads_ref(x, g, bias):
    """[N, D_out·D_in (+ D_out)]: each sample's weight (and bias) gradient, in float64."""
    x, g = x.double(), g.double()
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    w = torch.einsum("nto,nti->noi", g, x).flatten(1)
    return torch.cat([w, g.sum(1)], 1) if bias else w


def gram_tol(dtype, scale):
    """Absolute tolerance for Grams whose terms are of size `scale` (they accumulate in
    float32 at least; only the inputs' rounding, already in the reference, is free)."""
    eps = {torch.float64: 1e-13, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}[dtype]
    return dict(rtol=0, atol=eps * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [0.0, 1.0])
@pytest.mark.parametrize(
    "shape_a,shape_b",
    [((7, None), (5, None)), ((70, None), (130, None)), ((4, 3), (6, 5)), ((3, 1), (2, 1)), ((5, 9), (4, 2))],
    ids=["2d", "2d_tiles", "seq", "seq_t1", "seq_uneven"],
)
@pytest.mark.parametrize("method", ["auto", "ghost", "direct"])
def test_linear_gram(device, dtype, bias, shape_a, shape_b, method):
    d_in, d_out = 11, 6

    def factors(n, t):
        shape = (n,) if t is None else (n, t)
        return (
            torch.randn(*shape, d_in, device=device).to(dtype),
            torch.randn(*shape, d_out, device=device).to(dtype),
        )

    xa, ga = factors(*shape_a)
    xb, gb = factors(*shape_b)
    got = ops.linear_gram(xa, ga, xb, gb, bias=bias, method=method)
    wa, wb = linear_grads_ref(xa, ga, bias), linear_grads_ref(xb, gb, bias)
    ref = wa @ wb.t()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = (wa.abs() @ wb.abs().t()).max().item()
    torch.testing.assert_close(got.double(), ref, **gram_tol(dtype, scale))


def test_linear_gram_blocks_and_empty_sets():
    """Sets larger than one block (64 MiB of temporaries) give what small ones give, row by row."""
    xa, ga = torch.randn(3, 40, 30, dtype=torch.float64), torch.randn(3, 40, 20, dtype=torch.float64)
    xb, gb = torch.randn(2000, 40, 30, dtype=torch.float64), torch.randn(2000, 40, 20, dtype=torch.float64)
    big = ops.linear_gram(xa, ga, xb, gb, bias=1.0, method="ghost")  # 2·40·40·2000·8 B = 51 MB per sample of a
    small = torch.cat([ops.linear_gram(xa, ga, xb[i : i + 7], gb[i : i + 7], bias=1.0) for i in range(0, 2000, 7)], 1)
    torch.testing.assert_close(big, small, **TOL[torch.float64])
    assert ops.linear_gram(xa[:0], ga[:0], xb, gb).shape == (0, 2000)
    assert ops.linear_gram(xa, ga, xb[:0], gb[:0]).shape == (3, 0)
    assert ops.linear_gram(xa[:, :0], ga[:, :0], xb, gb).abs().max() == 0  # no positions: no gradient


def test_linear_gram_cost_rule():
    assert ops.linear_gram_uses_ghost(1, 1, 10, 10, 4096, 4096)  # one position: always the Grams
    assert ops.linear_gram_uses_ghost(
        16, 16, 64, 64, 512, 512
    )  # 256·(1024 + 256) = 0.33M <= 512²·(1 + 2·144/64) = 1.4M
    assert not ops.linear_gram_uses_ghost(512, 512, 64, 64, 256, 256)  # long sequences, narrow layer: direct
    assert ops.linear_gram_uses_ghost(64, 64, 64, 64, 4096, 4096)  # wide layer: the Grams


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_gram(device, dtype, padding_idx):
    v, d = 9, 5
    ids_a, ids_b = torch.randint(0, v, (6, 7), device=device), torch.randint(0, v, (4, 3), device=device)
    ids_a[:, 0], ids_b[1:, 1] = 0, 0  # id 0 on both sides: the padding id, or (None) a token like any other
    ga, gb = torch.randn(6, 7, d, device=device).to(dtype), torch.randn(4, 3, d, device=device).to(dtype)
    if padding_idx is not None:
        ga[ids_a == padding_idx] = float("nan")  # padding tokens get no gradient, NaN or not
    got = ops.embedding_gram(ids_a, ga, ids_b, gb, padding_idx)

    def grads(ids, g):
        w = torch.zeros(ids.shape[0], v, d, dtype=torch.float64, device=device)
        keep = torch.ones_like(ids, dtype=torch.bool) if padding_idx is None else ids != padding_idx
        for n in range(ids.shape[0]):
            w[n].index_add_(0, ids[n][keep[n]], g[n][keep[n]].double())
        return w.flatten(1)

    wa, wb = grads(ids_a, ga), grads(ids_b, gb)
    torch.testing.assert_close(got.double(), wa @ wb.t(), **gram_tol(dtype, (wa.abs() @ wb.abs().t()).max().item()))


def test_opcheck(device):
    xa, ga = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 2, device=device)
    xb, gb = torch.randn(2, 3, 5, device=device), torch.randn(2, 3, 2, device=device)
    ids_a, ids_b = torch.randint(0, 6, (3, 4), device=device), torch.randint(0, 6, (2, 3), device=device)
    cases = [
        (torch.ops.indivgrad_cuda.linear_gram, (xa, ga, xb, gb, 1.0, "ghost")),
        (torch.ops.indivgrad_cuda.linear_gram, (xa, ga, xb, gb, 0.0, "direct")),
        (torch.ops.indivgrad_cuda.linear_gram, (xa[:, 0], ga[:, 0], xb[:, 0], gb[:, 0], 1.0, "auto")),
        (torch.ops.indivgrad_cuda.embedding_gram, (ids_a, ga, ids_b, gb, 0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiled_call():
    xa, ga, xb, gb = torch.randn(3, 5), torch.randn(3, 2), torch.randn(4, 5), torch.randn(4, 2)
    fn = torch.compile(lambda *f: ops.linear_gram(*f, bias=1.0) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(xa, ga, xb, gb), ops.linear_gram(xa, ga, xb, gb, bias=1.0) * 2)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(xa=torch.randn(3, 4, 5, 6)), "xa: expected [N, D_in] or [N, T, D_in]"),
        (dict(ga=torch.randn(2, 4)), "ga: expected leading dims [3]"),
        (dict(xb=torch.randn(4, 6)), "xb, gb: expected widths D_in=5 and D_out=4 (xa's and ga's), got 6 and 4"),
        (dict(gb=torch.randn(4, 4, dtype=torch.float64)), "gb: expected dtype Float (xa's), got Double"),
        (dict(xa=torch.randint(0, 3, (3, 5))), "xa: expected"),
        (dict(bias=2.0), "bias: expected 0 (the weight's inner products) or 1 (weight and bias), got 2"),
        (dict(method="fast"), 'method: expected "auto", "ghost" or "direct", got "fast"'),
    ],
)
def test_linear_gram_errors(change, message):
    args = dict(xa=torch.randn(3, 5), ga=torch.randn(3, 4), xb=torch.randn(4, 5), gb=torch.randn(4, 4))
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        ops.linear_gram(
            args["xa"],
            args["ga"],
            args["xb"],
            args["gb"],
            bias=args.get("bias", 0.0),
            method=args.get("method", "auto"),
        )
    assert message in str(info.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(ids_b=torch.rand(4, 2)), "ids_b: expected dtype int64 or int32"),
        (dict(gb=torch.randn(4, 2, 3)), "gb: expected [4, 2, 5] (ids_b's [N, T] and the embedding width)"),
        (dict(ids_a=torch.randint(0, 3, (3,))), "ids_a: expected a 2-D tensor [N, T]"),
    ],
)
def test_embedding_gram_errors(change, message):
    args = dict(
        ids_a=torch.randint(0, 3, (3, 2)),
        ga=torch.randn(3, 2, 5),
        ids_b=torch.randint(0, 3, (4, 2)),
        gb=torch.randn(4, 2, 5),
    )
    args.update(change)
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        ops.embedding_gram(**args)
    assert message in str(info.value)
