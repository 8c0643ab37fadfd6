"""The fused ops on the shapes, alignments and launch conditions that choose the CUDA kernel's
code paths (csrc/outer_kernel.cuh), each checked against the float64 reference.

A bad kernel shows up as an element left unwritten, an element written out of bounds, or a
wrong value; so outputs are pre-filled with NaN (an unwritten element stays NaN), sit between
guard elements that must stay bit for bit as they were, and are compared to
tests/reference.py. Tests taking the `device` fixture also run on CPU, which proves their own
logic on a machine without a GPU; the CUDA-only ones need something only a GPU has (a plan
sized by its SM count and L2, streams, 2^31-element buffers, a second device).

Shapes are given as the output's [N, R, C] (`dims` turns them into N, D_in, D_out for each
layout), since the kernel's path depends on them: the fast path when every row of `out`
starts 16-byte aligned (out aligned and C % kVec == 0, kVec = 16 / element size: 2 to 8, so
C % 8 == 0 is fast in every dtype), the run path otherwise; column tiles of at most 256 vectors
(C > 256 * kVec gives several); blocks of up to 1024 rows that may span several samples. The
comments' block sizes are for a 132-SM GPU (H100, H200).
"""

import math

import pytest
import torch

import indivgrad_cuda as ig
from indivgrad_cuda.ops import ACTIVATIONS, LAYOUTS
from tests.conftest import DTYPES, PARAMS, TOL
from tests.reference import ACTIVATION_FNS, act_outer_ref, activation_backward_ref, outer_ref

NAN = float("nan")


def kvec(dtype):
    """Elements per 16-byte vector: the kernel's unit of alignment."""
    return 16 // dtype.itemsize


def dims(shape, layout):
    """(N, D_in, D_out) whose output in `layout` is [N, R, C] = shape."""
    n, r, c = shape
    return (n, r, c) if layout == "in_out" else (n, c, r)


def make_inputs(n, d_in, d_out, dtype, device):
    """Fresh random x, upstream and pre; pre spans both sides of every activation's kink and
    softplus's threshold (PARAMS: beta * pre > 3 on about a third of the entries)."""
    x = torch.randn(n, d_in, dtype=dtype, device=device)
    up = torch.randn(n, d_out, dtype=dtype, device=device)
    pre = 3 * torch.randn(n, d_out, dtype=dtype, device=device)
    return x, up, pre


def poisoned(shape, dtype, device):
    return torch.full(shape, NAN, dtype=dtype, device=device)


def assert_matches(got, ref, dtype, what, slack=0.0):
    """Every element written (no NaN left: the inputs are finite) and within TOL of the float64
    reference, plus `slack` (per element) where the activation's own rounding is allowed."""
    unwritten = torch.isnan(got)
    if unwritten.any():
        first = tuple(unwritten.nonzero()[0].tolist())
        pytest.fail(f"{what}: {int(unwritten.sum())} of {got.numel()} elements never written, the first at {first}")
    err = (got.double() - ref).abs()
    bad = err > TOL[dtype]["atol"] + TOL[dtype]["rtol"] * ref.abs() + slack
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        pytest.fail(
            f"{what}: {int(bad.sum())} of {got.numel()} elements off, the first at {i}: "
            f"{got[i].item()!r} where the reference is {ref[i].item()!r}"
        )


def activation_slack(up, pre, activation, **params):
    """Per element, twice how far torch's own autograd of the activation, in the op's compute
    dtype (float32 for float16/bfloat16) on the same device, lands from the float64 reference:
    rounding inside the formula (gelu_tanh's 1 + tanh(z) is 0 in float32 below pre = -5, where
    the true derivative is -1e-6) is allowed to the op too, as flash-attention judges low
    precision. Zero in float64, where torch's autograd is the reference."""
    compute = torch.float64 if up.dtype == torch.float64 else torch.float32
    p = pre.detach().to(compute).requires_grad_(True)
    (g,) = torch.autograd.grad(ACTIVATION_FNS[activation](p, **params), p, up.to(compute))
    return 2 * (g.double() - activation_backward_ref(up, pre, activation, **params)).abs()


def act_refs(x, up, pre, activation, layout, **params):
    """float64 (grad_weight, grad_bias) and the slack each is allowed (activation_slack)."""
    w_ref, b_ref = act_outer_ref(x, up, pre, activation, layout, **params)
    b_slack = activation_slack(up, pre, activation, **params)
    return (w_ref, outer_ref(x.abs(), b_slack, layout)), (b_ref, b_slack)


# ---------------------------------------------------------------------------------------------
# 1. Every path writes every element: outputs pre-filled with NaN.

PATH_SHAPES = {
    "fast": (4, 24, 64),
    "fast_tiles": (2, 6, 4104),  # C > 256 * kVec in every dtype: 3 to 9 column tiles
    "run_whole_rows": (3, 37, 45),  # odd C, one tile: a block writes its rows as one run
    "run_tiles_2049": (2, 5, 2049),  # odd C, 2 to 5 tiles: one run per row, scalar head and tail
    "run_tiles_4097": (2, 3, 4097),
    "run_tiles_rows_span_samples": (40, 15, 2049),  # 2 rows per block, some straddling two samples
    "run_span_samples": (3000, 3, 5),  # 9 rows per block: a block spans up to 4 samples
    "fast_span_samples": (2000, 3, 8),
    "one_column": (2, 40000, 1),
    "one_row": (2, 1, 40000),  # 20 to 79 column tiles of one row each
    "one_row_odd": (2, 1, 40001),
}


@pytest.mark.parametrize("shape", [pytest.param(s, id=k) for k, s in PATH_SHAPES.items()])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_element_written_on_every_path(device, dtype, layout, shape):
    x, up, pre = make_inputs(*dims(shape, layout), dtype, device)
    out, bias_out = poisoned(shape, dtype, device), poisoned(up.shape, dtype, device)
    w, b = ig.act_outer(x, up, pre, "silu", layout=layout, out=out, bias_out=bias_out)
    assert w is out and b is bias_out
    (w_ref, w_slack), (b_ref, b_slack) = act_refs(x, up, pre, "silu", layout)
    assert_matches(out, w_ref, dtype, "act_outer grad_weight", w_slack)
    assert_matches(bias_out, b_ref, dtype, "act_outer grad_bias", b_slack)

    out = poisoned(shape, dtype, device)  # the outer op: G as given, no grad_bias
    assert ig.outer(x, up, layout=layout, out=out) is out
    assert_matches(out, outer_ref(x, up, layout), dtype, "outer")


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_bias_when_grad_weight_is_empty(device, dtype, layout, activation):
    """D_in = 0: no block runs, grad_bias is still written, and computed as on every other path
    (float16/bfloat16 in float32, rounded once: rounding tanh(pre) or sigmoid(pre) to the half
    type first loses the derivative where they saturate)."""
    x, up, pre = make_inputs(5, 0, 300, dtype, device)
    bias_out = poisoned(up.shape, dtype, device)
    w, _ = ig.act_outer(x, up, pre, activation, layout=layout, bias_out=bias_out, **PARAMS)
    assert w.numel() == 0
    _, (b_ref, b_slack) = act_refs(x, up, pre, activation, layout, **PARAMS)
    assert_matches(bias_out, b_ref, dtype, "grad_bias", b_slack)


# ---------------------------------------------------------------------------------------------
# 2. Nothing written outside the outputs, at every misalignment.

GUARD = 64  # elements on each side; a multiple of every kVec, so `offset` is the misalignment
INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
GUARD_SHAPES = {
    "span_samples": (600, 3, 24),  # fast at offset 0, else runs of 2 rows across samples
    "tiles": (5, 7, 2056),  # fast with 2 to 5 tiles at offset 0, else one run per row and tile
    "odd": (7, 9, 45),  # run path at every offset, the run's head and tail sizes vary with it
}


def guarded(shape, dtype, device, offset):
    """(storage, view): a NaN-filled flat storage with a [shape] view starting `offset` elements
    past a 16-byte boundary (allocations are 16-byte aligned), at least GUARD elements inside
    each end, and a copy of the storage's bits taken before any write."""
    numel = math.prod(shape)
    storage = poisoned((GUARD + offset + numel + GUARD,), dtype, device)
    view = storage[GUARD + offset : GUARD + offset + numel].view(shape)
    assert view.data_ptr() % 16 == offset * view.element_size()
    return storage, view, storage.view(INT_VIEW[dtype]).clone()


def assert_guards_intact(storage, view, bits_before, what):
    bits = storage.view(INT_VIEW[storage.dtype])
    start, end = view.storage_offset(), view.storage_offset() + view.numel()
    assert torch.equal(bits[:start], bits_before[:start]), f"{what}: written before its start"
    assert torch.equal(bits[end:], bits_before[end:]), f"{what}: written past its end"


@pytest.mark.parametrize("shape", [pytest.param(s, id=k) for k, s in GUARD_SHAPES.items()])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_guards_untouched_at_every_misalignment(device, dtype, layout, shape):
    x, up, pre = make_inputs(*dims(shape, layout), dtype, device)
    (w_ref, w_slack), (b_ref, b_slack) = act_refs(x, up, pre, "tanh", layout)
    o_ref = outer_ref(x, up, layout)
    vec = kvec(dtype)
    for offset in range(vec):
        bias_offset = vec - 1 - offset  # also every misalignment, in the other order
        where = f"out offset {offset}, bias_out offset {bias_offset}"
        storage, out, before = guarded(shape, dtype, device, offset)
        b_storage, bias_out, b_before = guarded(tuple(up.shape), dtype, device, bias_offset)
        ig.act_outer(x, up, pre, "tanh", layout=layout, out=out, bias_out=bias_out)
        assert_guards_intact(storage, out, before, f"act_outer out ({where})")
        assert_guards_intact(b_storage, bias_out, b_before, f"act_outer bias_out ({where})")
        assert_matches(out, w_ref, dtype, f"act_outer grad_weight ({where})", w_slack)
        assert_matches(bias_out, b_ref, dtype, f"act_outer grad_bias ({where})", b_slack)

        storage, out, before = guarded(shape, dtype, device, offset)
        ig.outer(x, up, layout=layout, out=out)
        assert_guards_intact(storage, out, before, f"outer out (offset {offset})")
        assert_matches(out, o_ref, dtype, f"outer (offset {offset})")


# ---------------------------------------------------------------------------------------------
# 3. Every activation on the multi-tile paths, with and without bias_out (the outer op,
#    without pre, is covered above on every path).

MULTI_TILE_SHAPES = [(3, 4, 2056), (3, 4, 2049)]  # fast and run path, 2 to 5 column tiles


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_activation_on_multi_tile_paths(device, dtype, layout, activation):
    for shape in MULTI_TILE_SHAPES:
        x, up, pre = make_inputs(*dims(shape, layout), dtype, device)
        (w_ref, w_slack), (b_ref, b_slack) = act_refs(x, up, pre, activation, layout, **PARAMS)
        what = f"{activation} {list(shape)}"

        out, bias_out = poisoned(shape, dtype, device), poisoned(up.shape, dtype, device)
        ig.act_outer(x, up, pre, activation, layout=layout, out=out, bias_out=bias_out, **PARAMS)
        assert_matches(out, w_ref, dtype, f"{what}, with bias_out: grad_weight", w_slack)
        assert_matches(bias_out, b_ref, dtype, f"{what}, with bias_out: grad_bias", b_slack)

        out = poisoned(shape, dtype, device)
        _, b = ig.act_outer(x, up, pre, activation, layout=layout, out=out, **PARAMS)
        assert_matches(out, w_ref, dtype, f"{what}, out only: grad_weight", w_slack)
        assert_matches(b, b_ref, dtype, f"{what}, out only: grad_bias", b_slack)

        w, b = ig.act_outer(x, up, pre, activation, layout=layout, **PARAMS)  # buffers from the op
        assert_matches(w, w_ref, dtype, f"{what}, functional: grad_weight", w_slack)
        assert_matches(b, b_ref, dtype, f"{what}, functional: grad_bias", b_slack)


# ---------------------------------------------------------------------------------------------
# 4. Launch conditions only a GPU has: blocks over hundreds of samples, streaming stores,
#    buffers past 2^31 elements.


@pytest.mark.cuda
@pytest.mark.parametrize("c", [8, 7], ids=["fast", "run"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_blocks_spanning_hundreds_of_samples(dtype, layout, c):
    """1.2M rows of 3 per sample: blocks of 1024 rows over up to 342 samples; in float64 the
    staged columns exceed the shared-memory budget and the plan halves the block to 512 rows."""
    shape = (400_000, 3, c)
    x, up, pre = make_inputs(*dims(shape, layout), dtype, "cuda")
    out, bias_out = poisoned(shape, dtype, "cuda"), poisoned(up.shape, dtype, "cuda")
    ig.act_outer(x, up, pre, "gelu", layout=layout, out=out, bias_out=bias_out)
    (w_ref, w_slack), (b_ref, b_slack) = act_refs(x, up, pre, "gelu", layout)
    assert_matches(out, w_ref, dtype, "grad_weight", w_slack)
    assert_matches(bias_out, b_ref, dtype, "grad_bias", b_slack)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_stores_for_outputs_far_larger_than_l2(dtype, layout):
    """An output of 5x the device's L2 takes the fast path with evict-first stores (> 4x L2)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 64 * 2**20
    r, c = 512, 1024  # fast in every dtype
    n = math.ceil(5 * l2 / (r * c * dtype.itemsize))
    if torch.cuda.mem_get_info()[0] < 2 * 2**30:
        pytest.skip("needs 2 GiB of free GPU memory")
    x, up, pre = make_inputs(*dims((n, r, c), layout), dtype, "cuda")
    out, bias_out = poisoned((n, r, c), dtype, "cuda"), poisoned(up.shape, dtype, "cuda")
    ig.act_outer(x, up, pre, "softplus", layout=layout, out=out, bias_out=bias_out, **PARAMS)
    g = activation_backward_ref(up, pre, "softplus", **PARAMS)
    g_slack = activation_slack(up, pre, "softplus", **PARAMS)
    assert_matches(bias_out, g, dtype, "grad_bias", g_slack)
    for n0 in range(0, n, 16):  # the float64 reference a chunk of samples at a time
        s = slice(n0, n0 + 16)
        assert_matches(
            out[s],
            outer_ref(x[s], g[s], layout),
            dtype,
            f"grad_weight, samples {n0}+",
            outer_ref(x[s].abs(), g_slack[s], layout),
        )


def assert_no_nan_chunked(t, what, chunk=2**28):
    flat = t.view(-1)
    for i in range(0, flat.numel(), chunk):
        assert not torch.isnan(flat[i : i + chunk]).any(), f"{what}: unwritten elements in [{i}, {i + chunk})"


def rows_ref(x, g, layout, n, rows):
    """float64 rows `rows` of sample n's output, without forming the whole sample."""
    if layout == "in_out":
        return outer_ref(x[n : n + 1, rows], g[n : n + 1], layout)[0]
    return outer_ref(x[n : n + 1], g[n : n + 1, rows], layout)[0]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", [32776, 32771], ids=["fast", "run"])
def test_buffer_over_2_31_elements(c, layout):
    """[2, 32768, C] bfloat16 (4.3 GB): element offsets past 2^31 need 64-bit indexing. The
    rows checked include the one where the flat offset crosses 2^31 and the last rows."""
    dtype, (n, r) = torch.bfloat16, (2, 32768)
    torch.cuda.empty_cache()
    if torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 6 GiB of free GPU memory")
    x, up, pre = make_inputs(*dims((n, r, c), layout), dtype, "cuda")
    out, bias_out = poisoned((n, r, c), dtype, "cuda"), poisoned(up.shape, dtype, "cuda")
    assert out.numel() > 2**31
    ig.act_outer(x, up, pre, "relu", layout=layout, out=out, bias_out=bias_out)
    assert_no_nan_chunked(out, "grad_weight")
    g = activation_backward_ref(up, pre, "relu")
    assert_matches(bias_out, g, dtype, "grad_bias")
    crossing = 2**31 // c - r  # the row of sample 1 holding flat element 2^31
    rows = torch.tensor([0, 1, r // 2, crossing - 1, crossing, crossing + 1, r - 3, r - 2, r - 1], device="cuda")
    assert_matches(out[1, rows], rows_ref(x, g, layout, 1, rows), dtype, "grad_weight, sample 1")
    assert_matches(out[0, -2:], rows_ref(x, g, layout, 0, slice(r - 2, r)), dtype, "grad_weight, sample 0")
    del x, up, pre, out, bias_out, g
    torch.cuda.empty_cache()  # the other cases need the memory


# ---------------------------------------------------------------------------------------------
# 5. The current stream and device.


def act_outer_all_ways(x, up, pre, layout):
    """act_outer into poisoned buffers, act_outer allocating, and outer, on the current stream."""
    shape = (x.shape[0], *((x.shape[1], up.shape[1]) if layout == "in_out" else (up.shape[1], x.shape[1])))
    out, bias_out = poisoned(shape, x.dtype, x.device), poisoned(up.shape, x.dtype, x.device)
    ig.act_outer(x, up, pre, "elu", layout=layout, out=out, bias_out=bias_out, **PARAMS)
    w, b = ig.act_outer(x, up, pre, "elu", layout=layout, **PARAMS)
    return (out, bias_out), (w, b), ig.outer(x, up, layout=layout)


def assert_all_ways(results, x, up, pre, layout, what):
    (out, bias_out), (w, b), o = results
    w_ref, b_ref = act_refs(x, up, pre, "elu", layout, **PARAMS)
    for name, got, (ref, slack) in [
        ("out=", out, w_ref),
        ("bias_out=", bias_out, b_ref),
        ("grad_weight", w, w_ref),
        ("grad_bias", b, b_ref),
        ("outer", o, (outer_ref(x, up, layout), 0.0)),
    ]:
        assert got.device == x.device, f"{what}, {name}: on {got.device}"
        assert_matches(got, ref, x.dtype, f"{what}, {name}", slack)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_runs_on_the_current_stream(layout):
    """On a side stream, a long sleep then an overwrite of x precede the ops: a kernel launched
    on any other stream runs during the sleep and reads the old x."""
    x, up, pre = make_inputs(*dims((64, 33, 2056), layout), torch.float32, "cuda")
    x_new = torch.randn_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock cycles
        x.copy_(x_new)
        results = act_outer_all_ways(x, up, pre, layout)
    torch.cuda.synchronize()
    assert_all_ways(results, x_new, up, pre, layout, "side stream")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensors_on_a_device_other_than_the_current_one(layout):
    """Inputs on cuda:1 while cuda:0 is current: launched on cuda:1, on its current stream
    (the sleep and overwrite there again catch a launch elsewhere), with cuda:1's plan."""
    with torch.cuda.device(0):
        x, up, pre = make_inputs(*dims((3000, 3, 5), layout), torch.float32, "cuda:1")
        x_new = torch.randn_like(x)
        with torch.cuda.device(1):
            torch.cuda._sleep(100_000_000)
        x.copy_(x_new)  # on cuda:1's current stream, after the sleep
        assert torch.cuda.current_device() == 0
        results = act_outer_all_ways(x, up, pre, layout)
        torch.cuda.synchronize(1)
    assert_all_ways(results, x_new, up, pre, layout, "cuda:1")


# ---------------------------------------------------------------------------------------------
# 6. CPU and CUDA agree on the same inputs.

PARITY_SHAPES = [(6, 37, 2049), (300, 3, 8)]  # run path with tiles; fast path, blocks across samples


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_and_cuda_agree(dtype, layout, activation):
    """The same inputs on both devices: each result within TOL of the reference (plus its
    device's activation slack), and of the other; in float64 to 1e-12."""
    for shape in PARITY_SHAPES:
        x, up, pre = make_inputs(*dims(shape, layout), dtype, "cpu")
        pre[:, ::7] = 0  # the derivative conventions at the kinks
        on = {dev: (x.to(dev), up.to(dev), pre.to(dev)) for dev in ("cpu", "cuda")}
        got = {dev: ig.act_outer(*on[dev], activation, layout=layout, **PARAMS) for dev in on}
        refs = {dev: act_refs(*on[dev], activation, layout, **PARAMS) for dev in on}  # slack from torch on each
        for i, name in enumerate(("grad_weight", "grad_bias")):
            what = f"{activation} {list(shape)} {name}"
            cpu, cuda = got["cpu"][i], got["cuda"][i].cpu()
            (ref, slack_cpu), slack_cuda = refs["cpu"][i], refs["cuda"][i][1].cpu()
            assert_matches(cpu, ref, dtype, f"{what} on CPU", slack_cpu)
            assert_matches(cuda, ref, dtype, f"{what} on CUDA", slack_cuda)
            assert_matches(cuda, cpu.double(), dtype, f"{what}, CUDA against CPU", slack_cpu + slack_cuda)
        o_cpu, o_cuda = ig.outer(x, up, layout=layout), ig.outer(*on["cuda"][:2], layout=layout).cpu()
        assert_matches(o_cuda, outer_ref(x, up, layout), dtype, f"outer {list(shape)} on CUDA")
        assert_matches(o_cuda, o_cpu.double(), dtype, f"outer {list(shape)}, CUDA against CPU")
