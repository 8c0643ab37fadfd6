"""The cost rules of the sequence norms, measured: ghost against direct squared norms of
per-sample gradients (ig.ops.linear_sq_norms, ig.ops.embedding_sq_norms) over T, beside the
method "auto" picks, each result checked against the other method first.

    python bench/norms.py [--device cpu|cuda] [--n 32] [--quick]

Prints one table per layer shape: the median time of each method, the faster one, and
auto's pick (a pick slower than the other method by more than 20% is marked).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch

import common
import indivgrad_cuda as ig

LINEAR_SHAPES = [(128, 128), (256, 1024), (768, 768)]
TOKENS = [4, 16, 64, 256, 1024]
EMBEDDING = (1000, 128)  # vocabulary, width


def compare(label, run, ghost_picked, device):
    """(row text, whether auto's pick is within 20% of the faster method)."""
    ghost, direct = run("ghost"), run("direct")
    torch.testing.assert_close(ghost, direct, rtol=1e-4, atol=0)
    times = common.time_interleaved(
        {"ghost": lambda: run("ghost"), "direct": lambda: run("direct")}, device, budget_s=0.3
    )
    t_ghost, t_direct = times["ghost"], times["direct"]
    picked = t_ghost if ghost_picked else t_direct
    ok = picked <= 1.2 * min(t_ghost, t_direct)
    faster = "ghost" if t_ghost < t_direct else "direct"
    pick = "ghost" if ghost_picked else "direct"
    return (
        f"  {label:<8} {t_ghost:>10.3f} {t_direct:>10.3f}  {faster:<7} {pick:<7}{'' if ok else '  <- slower pick'}",
        ok,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=32, help="samples")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke tests")
    args = parser.parse_args(argv)
    shapes, tokens, (v, d) = ([(16, 24)], [2, 90], (50, 8)) if args.quick else (LINEAR_SHAPES, TOKENS, EMBEDDING)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"bench/norms.py on {common.device_name(device)}, N={args.n}, float32; times in ms")
    all_ok = True
    for d_in, d_out in shapes:
        print(f"\nLinear {d_in} -> {d_out}\n  {'T':<8} {'ghost':>10} {'direct':>10}  {'faster':<7} {'auto':<7}")
        for t in tokens:
            x = torch.randn(args.n, t, d_in, device=device)
            g = torch.randn(args.n, t, d_out, device=device)
            row, ok = compare(
                t,
                lambda m, x=x, g=g: ig.ops.linear_sq_norms(x, g, method=m),
                ig.ops.linear_norm_uses_ghost(t, d_in, d_out),
                device,
            )
            print(row)
            all_ok &= ok
    print(f"\nEmbedding {v} x {d}\n  {'T':<8} {'ghost':>10} {'direct':>10}  {'faster':<7} {'auto':<7}")
    for t in tokens:
        ids = torch.randint(0, v, (args.n, t), device=device)
        g = torch.randn(args.n, t, d, device=device)
        row, ok = compare(
            t,
            lambda m, ids=ids, g=g: ig.ops.embedding_sq_norms(ids, g, 0, method=m),
            ig._C.embedding_norm_uses_ghost(t, "auto"),
            device,
        )
        print(row)
        all_ok &= ok
    print(
        "\nauto picks " + ("within 20% of the faster method everywhere" if all_ok else "a slower method where marked")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
