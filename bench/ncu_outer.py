"""One launch of the outer-product kernel per case, for Nsight Compute to profile:

    ncu --kernel-name regex:outer_kernel --section SpeedOfLight ... python bench/ncu_outer.py

The cases are the shapes of bench/kernels.py whose numbers bench/NOTES.md reasons about: each
path of the kernel (16-byte and 8-byte fast paths, the run path) in float32 and bfloat16, in
nn.Linear's layout. ncu reports the launches in this order (`--list` prints it). Needs a GPU.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import indivgrad_cuda as ig

# (N, D_in, D_out, dtype, the path the plan takes for it)
CASES = [
    (256, 1024, 1024, torch.float32, "fast16"),
    (256, 1024, 1024, torch.bfloat16, "fast16"),
    (512, 300, 300, torch.float32, "fast16"),
    (512, 300, 300, torch.bfloat16, "fast8"),
    (1000, 100, 100, torch.bfloat16, "fast8"),
    (128, 1023, 257, torch.float32, "run"),
    (128, 1023, 257, torch.bfloat16, "run"),
]


def name(case):
    n, d_in, d_out, dtype, path = case
    return f"{n}x{d_in}x{d_out}/{str(dtype).replace('torch.', '')} ({path})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cases in launch order and exit")
    args = parser.parse_args(argv)
    for i, case in enumerate(CASES):
        print(f"launch {i}: outer {name(case)}")
    if args.list:
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench/ncu_outer.py: needs a CUDA GPU")
    for n, d_in, d_out, dtype, _ in CASES:
        x = torch.randn(n, d_in, device="cuda", dtype=dtype)
        g = torch.randn(n, d_out, device="cuda", dtype=dtype)
        ig.outer(x, g, layout="out_in")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
