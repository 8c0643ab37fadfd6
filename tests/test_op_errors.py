"""Every bad input to the ops gets an error naming the argument, what was expected and
what was given."""

import pytest
import torch

import indivgrad_cuda as ig


def inputs(n=3, d_in=4, d_out=5, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(n, d_in, dtype=dtype, device=device),
        torch.randn(n, d_out, dtype=dtype, device=device),
        torch.randn(n, d_out, dtype=dtype, device=device),
    )


def check_raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_bad_inputs(device):
    x, up, pre = inputs(device=device)
    check_raises(ValueError, r"x: expected a 2-D tensor \[N, D_in\], got shape \[12\]", ig.outer, x.flatten(), up)
    check_raises(ValueError, r"g: expected 3 rows \(N, from x\), got shape \[2, 5\]", ig.outer, x, up[:2])
    check_raises(ValueError, r"g: expected a 2-D tensor \[N, D_out\]", ig.outer, x, up[None])
    check_raises(TypeError, r"g: expected dtype Float \(x's dtype\), got Double", ig.outer, x, up.double())
    check_raises(
        TypeError, r"x: expected dtype float32, float64, float16 or bfloat16, got Int", ig.outer, x.int(), up.int()
    )
    check_raises(
        ValueError, r"layout: expected \"in_out\" .* or \"out_in\" .*, got \"io\"", ig.outer, x, up, layout="io"
    )
    check_raises(
        ValueError,
        r"activation: expected one of identity, relu, .*softplus; got \"swish\"",
        ig.act_outer,
        x,
        up,
        pre,
        "swish",
    )
    check_raises(
        ValueError,
        r"pre: expected shape \[3, 5\] \(upstream's shape\), got \[3, 6\]",
        ig.act_outer,
        x,
        up,
        torch.randn(3, 6, device=device),
    )
    check_raises(TypeError, r"pre: expected dtype Float", ig.act_outer, x, up, pre.half())


def test_bad_out_buffers(device):
    x, up, pre = inputs(device=device)
    good = dict(out=torch.empty(3, 4, 5, device=device), bias_out=torch.empty(3, 5, device=device))

    def call(**kw):
        return ig.act_outer(x, up, pre, "relu", **{**good, **kw})

    check_raises(
        ValueError, r"out: expected shape \[3, 4, 5\], got \[3, 5, 4\]", call, out=torch.empty(3, 5, 4, device=device)
    )
    check_raises(
        ValueError, r"out: expected shape \[3, 4, 5\], got \[2, 4, 5\]", call, out=torch.empty(2, 4, 5, device=device)
    )  # too small
    check_raises(
        TypeError,
        r"out: expected dtype Float \(x's dtype\), got Half",
        call,
        out=torch.empty(3, 4, 5, device=device, dtype=torch.half),
    )
    check_raises(
        ValueError, r"out: expected a contiguous tensor", call, out=torch.empty(3, 5, 4, device=device).transpose(1, 2)
    )
    check_raises(
        ValueError, r"bias_out: expected shape \[3, 5\], got \[3, 4\]", call, bias_out=torch.empty(3, 4, device=device)
    )
    check_raises(ValueError, r"bias_out: must not share memory with upstream", call, bias_out=up)
    check_raises(
        ValueError, r"bias_out: must not share memory with out", call, bias_out=good["out"].view(-1)[5:20].view(3, 5)
    )
    big = torch.empty(3 * 4 * 5 + 12, device=device)
    check_raises(
        ValueError, r"out: must not share memory with x", ig.outer, big[:12].view(3, 4), up, out=big[2:62].view(3, 4, 5)
    )
    # a strided (non-dense) input sharing out's storage is refused too
    base = torch.randn(60, device=device)
    check_raises(
        ValueError, r"out: must not share memory with x", ig.outer, base.view(3, 20)[:, ::5], up, out=base.view(3, 4, 5)
    )


@pytest.mark.cuda
def test_device_mismatch():
    x, up, pre = inputs(device="cuda")
    check_raises(ValueError, r"g: expected device cuda:0 \(x's device\), got cpu", ig.outer, x, up.cpu())
    check_raises(ValueError, r"pre: expected device cuda:0", ig.act_outer, x, up, pre.cpu())
    check_raises(
        ValueError, r"out: expected device cuda:0 \(x's device\), got cpu", ig.outer, x, up, out=torch.empty(3, 4, 5)
    )
