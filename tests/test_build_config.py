"""setup.py's toolchain decisions: forced modes, toolkit discovery, version checks."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("indivgrad_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__, so nothing is built
    for var in ("INDIVGRAD_CUDA", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    return module


def test_forced_cpu_build(setup_module, monkeypatch):
    monkeypatch.setenv("INDIVGRAD_CUDA", "0")
    assert setup_module.decide_cuda()[:2] == (False, None)


def test_bad_force_value(setup_module, monkeypatch):
    monkeypatch.setenv("INDIVGRAD_CUDA", "yes")
    with pytest.raises(SystemExit, match="INDIVGRAD_CUDA must be 0 or 1, got 'yes'"):
        setup_module.decide_cuda()


def test_forced_cuda_without_toolkit_says_what_is_missing(setup_module, monkeypatch):
    monkeypatch.setenv("INDIVGRAD_CUDA", "1")
    monkeypatch.setattr(setup_module, "find_cuda_home", lambda: None)
    with pytest.raises(SystemExit, match=r"INDIVGRAD_CUDA=1 but CUDA kernels cannot be built: .*no CUDA toolkit found"):
        setup_module.decide_cuda()


def test_without_toolkit_falls_back_to_cpu(setup_module, monkeypatch):
    monkeypatch.setattr(setup_module, "find_cuda_home", lambda: None)
    build_cuda, home, reason = setup_module.decide_cuda()
    assert not build_cuda and home is None and "no CUDA toolkit found" in reason


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None, reason="needs nvcc and a CUDA torch")
def test_toolkit_found_through_nvcc_and_version_checked(setup_module, monkeypatch):
    home = setup_module.find_cuda_home()
    assert home and (Path(home) / "include" / "cuda_runtime.h").exists()
    monkeypatch.setattr(setup_module, "nvcc_version", lambda _: "1.0")
    with pytest.raises(SystemExit, match=r"nvcc in .* is CUDA 1\.0, but torch .* was built with CUDA .*major versions"):
        setup_module.decide_cuda()


def test_cuda_home_env_wins_when_valid(setup_module, monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_module.find_cuda_home() == str(tmp_path.resolve())


@pytest.mark.parametrize(
    "torch_version, torch_cuda, cuda_kernels, label",
    [
        ("2.14.1+cu130", "13.0", True, "pt2.14.1cu130"),
        ("2.14.1+cu130", "13.0", False, "pt2.14.1cpu"),  # a CUDA torch, kernels not built
        ("2.13.0+cpu", None, False, "pt2.13.0cpu"),
        ("2.8.0", "12.8", True, "pt2.8.0cu128"),  # PyPI's default build carries no local label
    ],
)
def test_build_version_names_the_torch_and_cuda_built_against(
    setup_module, torch_version, torch_cuda, cuda_kernels, label
):
    info = {"torch": torch_version, "torch_cuda": torch_cuda, "cuda_kernels": cuda_kernels}
    version = setup_module.build_version(info)
    assert version == f"{setup_module.VERSION}+{label}"
    assert re.fullmatch(r"[0-9.]+\+[a-z0-9]+(\.[a-z0-9]+)*", version)  # a PEP 440 local version


def test_old_torch_is_refused_by_name(setup_module):
    setup_module.check_torch_version("2.4.0+cpu")
    with pytest.raises(SystemExit, match=r"torch 2\.3\.1 is installed; indivgrad_cuda needs torch >= 2\.4"):
        setup_module.check_torch_version("2.3.1")


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("readelf")), reason="needs g++ and readelf")
def test_an_extension_with_its_own_libstdcxx_is_refused_and_deleted(setup_module, tmp_path):
    """The image of the lent H200 had a g++ that links libstdc++ statically: an error raised in
    C++ then crashed Python. The build refuses such a library (and deletes it) by its needs."""
    source = tmp_path / "uses_streams.cpp"
    source.write_text("#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n")
    dynamic, static = tmp_path / "dynamic.so", tmp_path / "static.so"
    for out, extra in ((dynamic, []), (static, ["-static-libstdc++"])):
        subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(out), *extra], check=True)
    assert "libstdc++.so.6" in setup_module.needed_libraries(dynamic)
    setup_module.check_shared_libstdcxx(dynamic, "g++")  # passes, keeps the file
    assert dynamic.exists()
    with pytest.raises(
        SystemExit, match=r"compiler 'g\+\+' linked libstdc\+\+ statically into static\.so .*CXX=/usr/bin/g\+\+"
    ):
        setup_module.check_shared_libstdcxx(static, "g++")
    assert not static.exists()
