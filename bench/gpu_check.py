"""The Python half of bench/gpu_check.sh: checks and facts that need torch.

python bench/gpu_check.py verify-build   # exit 1 unless the CUDA kernels are built and a GPU works
python bench/gpu_check.py env            # versions, device, build_info (for env.txt)
python bench/gpu_check.py wheels         # versions of the benches' optional competitors
"""

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
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
    print("GPU:", torch.cuda.get_device_name(), "sm_{}{}".format(*torch.cuda.get_device_capability()))
    x, g = torch.randn(5, 33, device="cuda"), torch.randn(5, 17, device="cuda")
    err = (ig.outer(x, g, layout="in_out") - x[:, :, None] * g[:, None, :]).abs().max().item()
    if not err < 1e-5:
        return f"gpu_check: build check FAILED: ig.outer on cuda is off by {err:g}"
    print(f"build check ok: CUDA kernels compiled, GPU visible, ig.outer on cuda matches (max abs err {err:.1e})")
    print(cpp_error_round_trip())
    return 0


def cpp_error_round_trip():
    """Whether an error the ops raise in C++ reaches Python, checked in a fresh process: on the
    first H200 run it crashed the process instead (cause unknown, bench/NOTES.md)."""
    code = (
        "import torch, indivgrad_cuda as ig\ntry:\n    ig.outer(torch.randn(12), torch.randn(3, 5))\n"
        "except ValueError as e:\n    print(e)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if proc.returncode == 0 and "x: expected a 2-D tensor" in proc.stdout:
        return "C++ errors reach Python: ok"
    return (
        f"WARNING: a C++ error from the ops does not reach Python (exit {proc.returncode}; negative: a signal), "
        f"as on the first H200 run (bench/NOTES.md). {proc.stderr.strip()[-300:]}"
    )


def compilers():
    """The C++ compilers a build may use, their versions and default std::string ABI."""
    names = dict.fromkeys(c for c in (os.environ.get("CXX"), os.environ.get("CC"), "c++", "g++") if c)
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        macros = subprocess.run(
            [path, "-x", "c++", "-E", "-dM", "-"], input="#include <string>\n", capture_output=True, text=True
        ).stdout
        abi = next((line.split()[-1] for line in macros.splitlines() if "_GLIBCXX_USE_CXX11_ABI" in line), "?")
        print(f"compiler {name} ({path}): {version} | default _GLIBCXX_USE_CXX11_ABI {abi}")


def env():
    import torch

    print(
        f"python {platform.python_version()} ({sys.executable}) | torch {torch.__version__} | torch CUDA "
        f"{torch.version.cuda} | cuDNN {torch.backends.cudnn.version()} | cuda.is_available() "
        f"{torch.cuda.is_available()}"
    )
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        l2 = getattr(p, "L2_cache_size", 0) / 2**20
        print(
            f"device {i}: {p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | "
            f"{p.total_memory / 2**30:.1f} GiB | L2 {l2:.0f} MiB"
        )
    try:
        import indivgrad_cuda

        print("build_info:", json.dumps(indivgrad_cuda.build_info(), sort_keys=True))
    except Exception as e:  # noqa: BLE001  (a fact to record, not to raise)
        print(f"build_info: unavailable: {type(e).__name__}: {e}")
    print(
        f"torch._C._GLIBCXX_USE_CXX11_ABI {torch._C._GLIBCXX_USE_CXX11_ABI}; CC={os.environ.get('CC')!r} "
        f"CXX={os.environ.get('CXX')!r}"
    )
    compilers()
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
