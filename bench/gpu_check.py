"""The Python half of bench/gpu_check.sh: checks and facts that need torch.

python bench/gpu_check.py verify-build   # exit 1 unless the CUDA kernels are built and a GPU works
python bench/gpu_check.py env            # versions, device, build_info (for env.txt)
python bench/gpu_check.py wheels         # versions of the benches' optional competitors
python bench/gpu_check.py pick-compiler FILE  # a C++ compiler that links libstdc++ dynamically: CXX=, CC= into FILE
"""

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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


# pick-compiler: on the first H200 runs an error our ops raised in C++ killed the process
# (SIGSEGV) when the extension was built with the image's default compiler, /opt/gcc/bin/g++: it
# links libstdc++ statically (its copy's stream facets disagree with torch's libstdc++; the crash
# was in std::ostream::_M_insert<long> inside our library). setup.py now refuses such a build;
# this picks a compiler that links libstdc++ dynamically, tested on a one-line library.
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


STREAMS_CPP = "#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n"


def links_libstdcxx_dynamically(cxx, source, lib):
    """(ok, what) for a one-line shared library that uses C++ streams, linked by cxx."""
    from setup import loads_libstdcxx, needed_libraries

    link = subprocess.run([cxx, "-shared", "-fPIC", str(source), "-o", str(lib)], capture_output=True, text=True)
    if link.returncode != 0:
        return False, f"cannot link a shared library: {link.stderr.strip()[-300:]}"
    needed = needed_libraries(lib)
    if needed is None:
        return True, "readelf not found: not checked"
    ok = loads_libstdcxx(needed)
    return ok, f"links libstdc++ {'dynamically' if ok else 'STATICALLY'} (needs {', '.join(needed)})"


def pick_compiler(out_file):
    """Writes the CXX=/CC= lines of the first candidate that links libstdc++ dynamically into
    out_file (empty for the default compiler, or when none does)."""
    print("torch was built with:", next((x.strip() for x in torch_config() if "GCC" in x or "clang" in x), "?"))
    chosen = None
    with tempfile.TemporaryDirectory(prefix="igcxx") as tmp:
        source = Path(tmp) / "streams.cpp"
        source.write_text(STREAMS_CPP)
        for i, (label, extra) in enumerate(compiler_candidates()):
            cxx = extra.get("CXX") or os.environ.get("CXX") or "c++"
            version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
            ok, what = links_libstdcxx_dynamically(cxx, source, Path(tmp) / f"streams{i}.so")
            print(f"compiler {label}: {version}: {what}")
            if ok and chosen is None:
                chosen = (label, extra)
    lines = [f"{k}={v}" for k, v in (chosen[1] if chosen else {}).items()]
    Path(out_file).write_text("".join(line + "\n" for line in lines))
    print("build with:", chosen[0] if chosen else "the default (no candidate links libstdc++ dynamically)")
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
    # the peers of run.py (Opacus, BackPACK and its unfoldNd), dp_sgd_digits.py and attribution_digits.py
    for name in ("opacus", "backpack-for-pytorch", "unfoldNd", "dattri", "traker"):
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
