"""The fused ops against the float64 reference (tests/reference.py)."""

import pytest
import torch

import indivgrad_cuda as ig
from indivgrad_cuda.ops import ACTIVATIONS, LAYOUTS
from tests.conftest import DTYPES, PARAMS, TOL
from tests.reference import ACTIVATION_FNS, act_outer_ref, outer_ref


def make_inputs(n, d_in, d_out, dtype, device):
    x = torch.randn(n, d_in, dtype=dtype, device=device)
    up = torch.randn(n, d_out, dtype=dtype, device=device)
    pre = 3 * torch.randn(n, d_out, dtype=dtype, device=device)
    pre[:, ::4] = 0  # the derivative's convention at 0 matters for relu, leaky_relu, elu
    return x, up, pre


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_outer_matches_reference(device, dtype, layout):
    x, g, _ = make_inputs(7, 13, 9, dtype, device)
    got = ig.outer(x, g, layout=layout)
    assert got.dtype == dtype and got.device == x.device
    torch.testing.assert_close(got.double(), outer_ref(x, g, layout), **TOL[dtype])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_outer_matches_reference(device, dtype, layout, activation):
    x, up, pre = make_inputs(6, 11, 17, dtype, device)
    w, b = ig.act_outer(x, up, pre, activation, layout=layout, **PARAMS)
    w_ref, b_ref = act_outer_ref(x, up, pre, activation, layout, **PARAMS)
    assert w.dtype == b.dtype == dtype
    torch.testing.assert_close(b.double(), b_ref, **TOL[dtype])
    torch.testing.assert_close(w.double(), w_ref, **TOL[dtype])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_outer_default_parameters(device, activation):
    x, up, pre = make_inputs(4, 5, 6, torch.float64, device)
    pre[0, 1] = 30.0  # above softplus's default threshold
    w, b = ig.act_outer(x, up, pre, activation)
    w_ref, b_ref = act_outer_ref(x, up, pre, activation)
    torch.testing.assert_close(b, b_ref)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_like_autograd(device, activation):
    x, up, pre = make_inputs(3, 4, 8, torch.float64, device)
    pre[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    up[1, :2] = torch.tensor([float("nan"), float("inf")])
    w, b = ig.act_outer(x, up, pre, activation, **PARAMS)
    w_ref, b_ref = act_outer_ref(x, up, pre, activation, **PARAMS)
    torch.testing.assert_close(b, b_ref, equal_nan=True)
    torch.testing.assert_close(w, w_ref, equal_nan=True)


# torch's CPU elu backward disagrees with itself at pre = NaN: its vectorised loop tests
# `pre > 0` and takes the exponential branch (NaN); its scalar loop (the last elements of a
# contiguous tensor, strided inputs) and its CUDA kernel test `pre <= 0` and pass upstream
# through. The ops follow torch on each device, so there CPU and CUDA results differ (README,
# "The fused ops"). No other activation differs at NaN, ±inf or ±0 (checked with torch 2.14).
NAN_PRE_IS_NAN_IN_TORCH_CPU_VECTOR_LOOP = ("elu",)


def special_inputs(dtype, device):
    """[6, 45] inputs (D_in 9) with NaN, ±inf, ±0 and huge values in pre, upstream and x, at the
    start of the tensors (inside torch's CPU vectorised loop) and in their last four elements
    (its scalar tail, for every vector width up to 32 elements)."""
    x, up, pre = make_inputs(6, 9, 45, dtype, device)
    nan, inf = float("nan"), float("inf")
    pre[0, :8] = torch.tensor([nan, inf, -inf, 0.0, -0.0, 1e30, -1e30, 40.0])
    pre[1, :3] = torch.tensor([nan, inf, 0.0])
    up[1, :3] = torch.tensor([inf, nan, inf])
    up[2, :4] = torch.tensor([nan, inf, -inf, 0.0])
    x[3, :2] = torch.tensor([nan, inf])
    pre[-1, -4:] = torch.tensor([nan, inf, -inf, 0.0])
    return x, up, pre


def torch_backward_same_dtype(up, pre, activation, **params):
    """upstream * act'(pre) by torch's own autograd in the inputs' dtype and on their device."""
    pre = pre.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ACTIVATION_FNS[activation](pre, **params), pre, up)
    return g


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values_follow_torch_on_each_device(device, dtype, activation):
    """Element by element, NaN and inf land where torch's own autograd puts them on the same
    device in the same dtype (on CPU that depends on the element's position, see above)."""
    x, up, pre = special_inputs(dtype, device)
    w, b = ig.act_outer(x, up, pre, activation, layout="out_in", **PARAMS)
    g = torch_backward_same_dtype(up, pre, activation, **PARAMS)
    torch.testing.assert_close(b, g, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(w.double(), outer_ref(x, g, "out_in"), equal_nan=True, **TOL[dtype])
    if device == "cpu" and activation in NAN_PRE_IS_NAN_IN_TORCH_CPU_VECTOR_LOOP:
        # pins the documented convention: if torch changes it, README must change too
        assert torch.isnan(b[0, 0]), "torch's CPU vectorised loop no longer gives NaN at pre = NaN: update README"
        assert b[-1, -4] == up[-1, -4], "torch's CPU scalar loop no longer passes upstream at pre = NaN: update README"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "n,d_in,d_out",
    [
        (0, 5, 3),
        (1, 1, 1),
        (1, 7, 1),
        (3, 1, 5),
        (5, 3, 2),
        (9, 97, 101),
        (2, 3001, 7),
        (2, 7, 3001),
        (3, 4099, 5),
        (1, 129, 4097),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes(device, n, d_in, d_out, layout, dtype):
    x, up, pre = make_inputs(n, d_in, d_out, dtype, device)
    w, b = ig.act_outer(x, up, pre, "silu", layout=layout)
    w_ref, b_ref = act_outer_ref(x, up, pre, "silu", layout)
    assert w.shape == w_ref.shape and b.shape == b_ref.shape
    torch.testing.assert_close(w.double(), w_ref, **TOL[dtype])
    torch.testing.assert_close(b.double(), b_ref, **TOL[dtype])
    torch.testing.assert_close(ig.outer(x, up, layout=layout).double(), outer_ref(x, up, layout), **TOL[dtype])


def test_non_contiguous_inputs(device):
    base_x = torch.randn(9, 20, device=device)
    base_u = torch.randn(30, 9, device=device)
    x = base_x[:, ::2]  # strided columns
    up = base_u.t()  # transposed
    pre = torch.randn(9, 60, device=device)[:, 1::2]
    assert not (x.is_contiguous() or up.is_contiguous() or pre.is_contiguous())
    for layout in LAYOUTS:
        w, b = ig.act_outer(x, up, pre, "tanh", layout=layout)
        w_ref, b_ref = act_outer_ref(x, up, pre, "tanh", layout)
        torch.testing.assert_close(w.double(), w_ref, **TOL[torch.float32])
        torch.testing.assert_close(b.double(), b_ref, **TOL[torch.float32])
        torch.testing.assert_close(
            ig.outer(x, up, layout=layout).double(), outer_ref(x, up, layout), **TOL[torch.float32]
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_buffers_are_written_in_place_and_reusable(device, layout):
    shape = (5, 6, 4) if layout == "in_out" else (5, 4, 6)
    out = torch.full(shape, float("nan"), device=device)
    bias_out = torch.full((5, 4), float("nan"), device=device)
    for _step in range(3):  # fresh data each step into the same buffers
        x, up, pre = make_inputs(5, 6, 4, torch.float32, device)
        w, b = ig.act_outer(x, up, pre, "elu", layout=layout, out=out, bias_out=bias_out)
        assert w.data_ptr() == out.data_ptr() and b.data_ptr() == bias_out.data_ptr()
        w_ref, b_ref = act_outer_ref(x, up, pre, "elu", layout)
        torch.testing.assert_close(out.double(), w_ref, **TOL[torch.float32])
        torch.testing.assert_close(bias_out.double(), b_ref, **TOL[torch.float32])
        got = ig.outer(x, up, layout=layout, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out.double(), outer_ref(x, up, layout), **TOL[torch.float32])


def test_only_one_of_out_and_bias_out(device):
    x, up, pre = make_inputs(3, 4, 5, torch.float64, device)
    w_ref, b_ref = act_outer_ref(x, up, pre, "relu")
    out = torch.empty(3, 4, 5, dtype=torch.float64, device=device)
    w, b = ig.act_outer(x, up, pre, "relu", out=out)
    assert w is out
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(b, b_ref)
    bias_out = torch.empty(3, 5, dtype=torch.float64, device=device)
    w, b = ig.act_outer(x, up, pre, "relu", bias_out=bias_out)
    assert b is bias_out
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(b, b_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_misaligned_out_buffer(device, dtype):
    """out starting off a 16-byte boundary takes the scalar head/tail path."""
    x, up, pre = make_inputs(3, 37, 5, dtype, device)
    for layout in LAYOUTS:
        storage = torch.empty(3 * 37 * 5 + 1, dtype=dtype, device=device)
        out = storage[1:].view((3, 37, 5) if layout == "in_out" else (3, 5, 37))
        ig.act_outer(x, up, pre, "sigmoid", layout=layout, out=out)
        torch.testing.assert_close(out.double(), act_outer_ref(x, up, pre, "sigmoid", layout)[0], **TOL[dtype])
