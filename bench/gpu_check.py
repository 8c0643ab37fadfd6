"""The Python half of bench/gpu_check.sh: checks and facts that need torch.

    python bench/gpu_check.py verify-build   # exit 1 unless the CUDA kernels are built and a GPU works
    python bench/gpu_check.py env            # versions, device, build_info (for env.txt)
    python bench/gpu_check.py wheels         # versions of the benches' optional competitors
"""

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's indivgrad_cuda, as the tests use


def verify_build():
    """Fails loudly unless indivgrad_cuda has CUDA kernels, torch sees a GPU, and ig.outer
    on that GPU matches a broadcast multiply."""
    import torch

    import indivgrad_cuda as ig

    info = ig.build_info()
    print("build_info:", json.dumps(info, sort_keys=True))
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda.is_available():", torch.cuda.is_available())
    bad = []
    if not info.get("cuda_kernels"):
        bad.append("indivgrad_cuda was built WITHOUT CUDA kernels")
    if not torch.cuda.is_available():
        bad.append("torch.cuda.is_available() is False")
    if bad:
        return "gpu_check: build check FAILED: " + "; ".join(bad)
    print("GPU:", torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability())
    x, g = torch.randn(5, 33, device="cuda"), torch.randn(5, 17, device="cuda")
    err = (ig.outer(x, g, layout="in_out") - x[:, :, None] * g[:, None, :]).abs().max().item()
    if not err < 1e-5:
        return f"gpu_check: build check FAILED: ig.outer on cuda is off by {err:g}"
    print(f"build check ok: CUDA kernels compiled, GPU visible, ig.outer on cuda matches (max abs err {err:.1e})")
    return 0


def env():
    import torch

    print(f"python {platform.python_version()} ({sys.executable}) | torch {torch.__version__} | torch CUDA "
          f"{torch.version.cuda} | cuDNN {torch.backends.cudnn.version()} | cuda.is_available() "
          f"{torch.cuda.is_available()}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        l2 = getattr(p, "L2_cache_size", 0) / 2**20
        print(f"device {i}: {p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | "
              f"{p.total_memory / 2**30:.1f} GiB | L2 {l2:.0f} MiB")
    try:
        import indivgrad_cuda

        print("build_info:", json.dumps(indivgrad_cuda.build_info(), sort_keys=True))
    except Exception as e:  # noqa: BLE001  (a fact to record, not to raise)
        print(f"build_info: unavailable: {type(e).__name__}: {e}")
    return 0


def wheels():
    for name in ("opacus", "backpack-for-pytorch", "unfoldNd"):
        try:
            print(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            print(name, "not installed")
    return 0


COMMANDS = {"verify-build": verify_build, "env": env, "wheels": wheels}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]]()


if __name__ == "__main__":
    sys.exit(main())
