"""The Python half of bench/gpu_check.sh: checks and facts that need torch.

python bench/gpu_check.py verify-build   # exit 1 unless the CUDA kernels are built and a GPU works
python bench/gpu_check.py env            # versions, device, build_info (for env.txt)
python bench/gpu_check.py wheels         # versions of the benches' optional competitors
python bench/gpu_check.py pick-compiler FILE  # a C++ compiler whose errors reach Python: CXX=, CC= lines into FILE
"""

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
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


# pick-compiler: on the first H200 run an error our ops raised in C++ killed the process (SIGSEGV)
# instead of reaching Python, with the image's default compiler (/opt/gcc). Each candidate
# compiler builds the same tiny extension the way setup.py builds ours (setuptools +
# BuildExtension, so the same flags), whose op raises a ValueError in C++; the first candidate
# whose error reaches Python builds the real extension. A SIGSEGV handler in the probe prints
# the native stack (glibc's backtrace), and the probe prints which libstdc++ and libgcc_s it loaded.
PROBE_CPP = r"""
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
#include <torch/extension.h>
#include <torch/library.h>

at::Tensor probe_check(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor, got ", x.dim(), "-D");
  return x;
}
TORCH_LIBRARY(igprobe, m) { m.def("check(Tensor x) -> Tensor", &probe_check); }

static void on_segv(int) {
  void* frames[64];
  int n = backtrace(frames, 64);
  static const char kHead[] = "SIGSEGV; native stack:\n";
  write(2, kHead, sizeof(kHead) - 1);
  backtrace_symbols_fd(frames, n, 2);
  _exit(139);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { signal(SIGSEGV, on_segv); }
"""
PROBE_SETUP = """from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
setup(name="igprobe", ext_modules=[CppExtension("igprobe", ["probe.cpp"], extra_compile_args=["-O3"])],
      cmdclass={"build_ext": BuildExtension})
"""
PROBE_CALL = """import torch, igprobe
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l or "libgcc_s" in l})
print("loaded:", ", ".join(libs))
try:
    torch.ops.igprobe.check(torch.randn(3))
except ValueError as e:
    print("ValueError:", str(e).splitlines()[0])
"""


def compiler_candidates():
    """(label, extra environment) for the default compiler and each system g++ beside it."""
    default = os.environ.get("CXX") or shutil.which("c++") or "c++"
    found = [(f"default (CXX={default})", {})]
    seen = {os.path.realpath(shutil.which(default) or default)}
    for cxx in ["/usr/bin/g++", *sorted(Path("/usr/bin").glob("g++-[0-9]*"), reverse=True)]:
        real = os.path.realpath(cxx)
        if not os.path.exists(real) or real in seen:
            continue
        seen.add(real)
        cc = str(cxx).replace("g++", "gcc")
        found.append((str(cxx), {"CXX": str(cxx), "CC": cc if os.path.exists(cc) else str(cxx)}))
    return found


def probe_compiler(label, extra, workdir):
    """Builds the probe with one compiler; returns (ok, report lines)."""
    env = {**os.environ, **extra, "MAX_JOBS": "1"}
    workdir.mkdir(parents=True)
    (workdir / "probe.cpp").write_text(PROBE_CPP)
    (workdir / "setup.py").write_text(PROBE_SETUP)
    cxx = extra.get("CXX") or os.environ.get("CXX") or "c++"
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    report = [f"compiler {label}: {version}"]
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=workdir, env=env, capture_output=True, text=True
    )
    if build.returncode != 0:
        return False, [*report, f"  probe build FAILED (exit {build.returncode}): {build.stderr.strip()[-600:]}"]
    call = subprocess.run([sys.executable, "-c", PROBE_CALL], cwd=workdir, env=env, capture_output=True, text=True)
    ok = call.returncode == 0 and "ValueError: x: expected a 2-D tensor" in call.stdout
    verdict = "the C++ error reaches Python" if ok else f"FAILED, exit {call.returncode} (negative: a signal)"
    report += [f"  {verdict}", *("  " + line for line in (call.stdout + call.stderr).strip().splitlines()[-40:])]
    return ok, report


def pick_compiler(out_file):
    """Writes the CXX=/CC= lines of the first candidate whose C++ errors reach Python into
    out_file (empty for the default compiler, or when none does)."""
    candidates = compiler_candidates()
    print("torch was built with:", next((x.strip() for x in torch_config() if "GCC" in x or "clang" in x), "?"))
    with tempfile.TemporaryDirectory(prefix="igprobe") as tmp, ThreadPoolExecutor(len(candidates)) as pool:
        results = list(pool.map(lambda c: probe_compiler(*c[1], Path(tmp) / str(c[0])), enumerate(candidates)))
    for _, report in results:
        print("\n".join(report))
    chosen = next((c for c, (ok, _) in zip(candidates, results) if ok), None)
    lines = [f"{k}={v}" for k, v in (chosen[1] if chosen else {}).items()]
    Path(out_file).write_text("".join(line + "\n" for line in lines))
    print("build with:", chosen[0] if chosen else "the default (no candidate's C++ errors reach Python)")
    return 0


def torch_config():
    import torch

    return torch.__config__.show().splitlines()


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


COMMANDS = {"verify-build": verify_build, "env": env, "wheels": wheels, "pick-compiler": pick_compiler}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS or len(argv) != (2 if argv[0] == "pick-compiler" else 1):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main())
