"""Build indivgrad_cuda's compiled extension against the torch that is installed.

Build with ``pip install --no-build-isolation -e .``: the compiled code is tied to the
exact torch it was compiled against, so the build must see the torch you will import.

Environment:
  INDIVGRAD_CUDA=0|1     force a C++-only (CPU) build, or require the CUDA kernels.
                         Unset: CUDA kernels are built when torch is a CUDA build and an
                         nvcc is found (a visible GPU is not needed).
  CUDA_HOME / CUDA_PATH  the CUDA toolkit to use (else found from nvcc, then /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST   GPU architectures; unset and no GPU visible: "8.0;9.0+PTX".

The package's version carries a local label naming the torch and CUDA it was built against
(0.2.0+pt2.14.1cu130; "cpu" for a build without the CUDA kernels), and its metadata requires
exactly that torch release, so pip refuses to install a wheel beside another torch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "indivgrad_cuda" / "_version.py").read_text()).group(1)
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100/H200, plus PTX for newer cards
MIN_TORCH = (2, 4)  # torch.library.register_fake, which the op registration uses


def _fail(msg):
    sys.exit(f"indivgrad_cuda build: {msg}")


def _is_toolkit(path):
    return path and (Path(path) / "bin" / "nvcc").exists() and (Path(path) / "include" / "cuda_runtime.h").exists()


def find_cuda_home():
    """Return the CUDA toolkit root, or None.

    torch guesses CUDA_HOME as the parent of the `nvcc` on PATH; when that nvcc is a
    wrapper script (here /usr/local/bin/nvcc) the guess (/usr/local) has no headers.
    So ask nvcc itself where it lives (`--dryrun` prints `_HERE_=<toolkit>/bin`).
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-v", "x.cu"], capture_output=True, text=True, timeout=60)
            m = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
            if m:
                candidates.append(str(Path(m.group(1)).parent))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    return next((str(Path(c).resolve()) for c in candidates if _is_toolkit(c)), None)


def torch_release(torch_version):
    """The public release of a torch version string: "2.14.1+cu130" -> "2.14.1"."""
    return torch_version.split("+")[0]


def build_version(info):
    """VERSION plus a local label for the torch and CUDA of this build, as flash-attn and
    torchao label their wheels: 0.2.0+pt2.14.1cu130, or 0.2.0+pt2.13.0cpu without CUDA kernels."""
    accel = "cu" + info["torch_cuda"].replace(".", "") if info["cuda_kernels"] else "cpu"
    return f"{VERSION}+pt{torch_release(info['torch'])}{accel}"


def check_torch_version(torch_version):
    release = tuple(int(p) for p in re.findall(r"\d+", torch_release(torch_version))[:2])
    if release < MIN_TORCH:
        _fail(f"torch {torch_version} is installed; indivgrad_cuda needs torch >= {'.'.join(map(str, MIN_TORCH))}")


def needed_libraries(path):
    """The shared libraries an ELF file names as needed (its DT_NEEDED entries), from readelf;
    None when binutils' readelf is not on PATH."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def loads_libstdcxx(needed):
    return any(lib.startswith("libstdc++") for lib in needed)


def check_shared_libstdcxx(path, compiler):
    """Refuses an extension that carries its own copy of libstdc++ (a compiler that links it
    statically, like the /opt/gcc wrapper of an H200 image): beside torch's libstdc++ the two
    copies disagree on the stream facets, so an error the ops raise in C++ crashes Python or
    loses the numbers in its message. Deletes the file so that nothing imports it."""
    needed = needed_libraries(path)
    if needed is None:
        print(
            "indivgrad_cuda build: warning: readelf not found, so the check that libstdc++ is linked dynamically "
            "was skipped"
        )
    elif not loads_libstdcxx(needed):
        Path(path).unlink()
        _fail(
            f"the C++ compiler {compiler!r} linked libstdc++ statically into {Path(path).name} (it needs only "
            f"{', '.join(needed) or 'nothing'}). Beside torch's own libstdc++ that copy breaks the errors the ops "
            "raise: they crash Python (seen on an H200 image) or lose the numbers in their message. Build with a "
            "compiler that links libstdc++ dynamically, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc pip install "
            "--no-build-isolation -e ."
        )


def nvcc_version(cuda_home):
    out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def decide_cuda():
    """Return (build_cuda, cuda_home, reason) following INDIVGRAD_CUDA and the toolchain."""
    import torch

    forced = os.environ.get("INDIVGRAD_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        _fail(f"INDIVGRAD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, None, "INDIVGRAD_CUDA=0"
    cuda_home = find_cuda_home()
    missing = []
    if torch.version.cuda is None:
        missing.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc and include/)")
    if missing:
        if forced == "1":
            _fail("INDIVGRAD_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(missing))
        return False, None, "; ".join(missing)
    version = nvcc_version(cuda_home)
    if version is None or version.split(".")[0] != torch.version.cuda.split(".")[0]:
        _fail(
            f"nvcc in {cuda_home} is CUDA {version}, but torch {torch.__version__} was built with "
            f"CUDA {torch.version.cuda}: the major versions must match. Install a matching torch "
            f"or point CUDA_HOME at a matching toolkit (or build CPU-only with INDIVGRAD_CUDA=0)."
        )
    return True, cuda_home, f"nvcc {version} in {cuda_home}"


def build_extension():
    import torch

    check_torch_version(torch.__version__)
    build_cuda, cuda_home, reason = decide_cuda()
    if build_cuda:
        # cpp_extension reads CUDA_HOME when it is imported, so set it first.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    from torch.utils import cpp_extension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cxx_flags = ["-O3"]
    if build_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
        ext = cpp_extension.CUDAExtension(
            "indivgrad_cuda._C",
            sources,
            extra_compile_args={"cxx": [*cxx_flags, "-DINDIVGRAD_WITH_CUDA"], "nvcc": ["-O3", "-DINDIVGRAD_WITH_CUDA"]},
        )
    else:
        ext = cpp_extension.CppExtension("indivgrad_cuda._C", sources, extra_compile_args={"cxx": cxx_flags})

    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": build_cuda,
        "nvcc": nvcc_version(cuda_home) if build_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
        if build_cuda
        else None,
        "why": reason,
        "python": sys.version.split()[0],
    }
    info["build_version"] = build_version(info)
    print(f"indivgrad_cuda build: CUDA kernels {'on' if build_cuda else 'off'} ({reason})")

    class BuildExt(cpp_extension.BuildExtension):
        """Checks that libstdc++ is linked dynamically, then writes _build_info.json beside the
        compiled module so import can check it."""

        def run(self):
            super().run()
            built = Path(self.get_ext_fullpath("indivgrad_cuda._C"))
            check_shared_libstdcxx(built, (getattr(self.compiler, "compiler_cxx", None) or ["c++"])[0])
            target = built.parent / "_build_info.json"
            target.write_text(json.dumps(info, indent=2) + "\n")

    return ext, BuildExt.with_options(use_ninja=shutil.which("ninja") is not None), info


if __name__ == "__main__":  # pip / setuptools run this file as __main__; tests import it
    ext, build_ext_cls, info = build_extension()
    setup(
        name="indivgrad_cuda",
        version=info["build_version"],
        install_requires=[f"torch=={torch_release(info['torch'])}"],  # the torch it was compiled against
        packages=find_packages(include=["indivgrad_cuda", "indivgrad_cuda.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": build_ext_cls},
        package_data={"indivgrad_cuda": ["_build_info.json"]},
    )
