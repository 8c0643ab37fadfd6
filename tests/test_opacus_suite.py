"""Opacus's own tests of the grad samplers we replace, run with our backend installed: every
test of those files passes, and our samplers were the ones called.

The suites run in one subprocess (this file run as a script): they change process-wide
state (Opacus's sampler tables, ``torch.set_default_dtype``) and load a hypothesis profile,
none of which may leak into this session. There our samplers are wrapped so that each call
is counted against the test file running, then installed, then ``pytest.main`` runs the
files; the counts and each test's outcome come back as JSON.

Opacus's hypothesis tests draw ``max_examples`` examples each: here
``INDIVGRAD_OPACUS_EXAMPLES`` (default 100, hypothesis's own default), derandomized and
with torch seeded, so every run sees the same cases; and every run also tries the cases in
``PINNED`` (empty batches among them). Measured on this project's 2-core machine, the ten
suites with 100 examples take ~25 s of wall time when it is otherwise idle, up to ~2.5
minutes when it is busy with other work (Opacus's samplers alone: ~5 minutes then); set
the variable lower on a slower machine.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("opacus", reason="Opacus is not installed (pip install -e .[opacus])")
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e .[test])")

EXAMPLES = int(os.environ.get("INDIVGRAD_OPACUS_EXAMPLES", "100"))

# suite -> (its file under opacus/tests, the samplers of ours it must call: "<type>.<grad|norm>")
SUITES = {
    "linear": ("grad_samples/linear_test.py", ["Linear.grad"]),
    "conv1d": ("grad_samples/conv1d_test.py", ["Conv1d.grad"]),
    "conv2d": ("grad_samples/conv2d_test.py", ["Conv2d.grad"]),
    "conv3d": ("grad_samples/conv3d_test.py", ["Conv3d.grad"]),
    "group_norm": ("grad_samples/group_norm_test.py", ["GroupNorm.grad"]),
    "instance_norm1d": ("grad_samples/instance_norm1d_test.py", ["InstanceNorm1d.grad"]),
    "instance_norm2d": ("grad_samples/instance_norm2d_test.py", ["InstanceNorm2d.grad"]),
    "instance_norm3d": ("grad_samples/instance_norm3d_test.py", ["InstanceNorm3d.grad"]),
    "hooks_fast_gradient_clipping": ("grad_sample_hooks_fast_gradient_clipping_test.py", ["Linear.grad"]),
    # SampleConvNet under ghost clipping: the convolutions' and the Linear layers' norm samplers
    "module_fast_gradient_clipping": (
        "grad_sample_module_fast_gradient_clipping_test.py",
        ["Conv2d.norm", "Linear.norm", "Conv2d.grad", "Linear.grad"],
    ),
    # float16/bfloat16 models and autocast, in every grad_sample_mode (its tests need CUDA)
    "mixed_precision": (
        "mixed_precision_test.py",
        ["Conv1d.grad", "Conv2d.grad", "Conv3d.grad", "Conv1d.norm", "Conv2d.norm", "Conv3d.norm", "Linear.norm"],
    ),
}
# what a suite needs beyond Opacus and hypothesis (a module); the suites whose tests need CUDA
NEEDS = {"module_fast_gradient_clipping": "torchvision"}
CUDA_SUITES = {"mixed_precision"}


def _has(need: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(need) is not None


# Cases every run tries, whatever the examples drawn: hypothesis's @example added to Opacus's
# tests (suite -> (class, test, [the test's arguments])): empty batches, with sequence dims
# and the batch second for nn.Linear, and convolutions with groups, "same" padding, dilation.
# "expander"/"shrinker" name the out-channel mappers of opacus/tests/grad_samples/common.py.
_LINEAR = dict(Z=2, H=3, W=10, bias=True)
_CONV = dict(C=3, out_channels_mapper="expander", kernel_size=3, stride=1, padding=0, dilation=1, groups=1)
PINNED = {
    "linear": (
        "Linear_test",
        "test_input_bias",
        [
            dict(_LINEAR, N=0, input_dim=3, batch_first=True),
            dict(_LINEAR, N=0, input_dim=4, batch_first=True),
            dict(_LINEAR, N=0, input_dim=4, batch_first=False),
            dict(_LINEAR, N=3, input_dim=4, batch_first=False),
        ],
    ),
    "conv1d": (
        "Conv1d_test",
        "test_conv1d",
        [
            dict(_CONV, N=0, W=8, stride=2, padding=1, groups=3),
            dict(
                _CONV,
                N=3,
                C=32,
                W=9,
                out_channels_mapper="shrinker",
                kernel_size=2,
                padding="same",
                dilation=2,
                groups=4,
            ),
        ],
    ),
    "conv2d": (
        "Conv2d_test",
        "test_conv2d",
        [
            dict(_CONV, N=0, H=11, W=12, padding=2, groups=3),
            dict(_CONV, N=2, H=11, W=12, padding="same", groups=3, dilation=2),
            dict(_CONV, N=3, C=32, H=11, W=12, out_channels_mapper="shrinker", groups=16, stride=2),
        ],
    ),
    "conv3d": (
        "Conv3d_test",
        "test_conv3d",
        [
            dict(_CONV, N=0, D=4, H=6, W=7, kernel_size=2),
            dict(
                _CONV,
                N=2,
                D=5,
                H=7,
                W=6,
                kernel_size=(1, 2, 3),
                stride=(1, 2, 3),
                padding=(1, 2, 3),
                dilation=(1, 2, 2),
                groups=3,
            ),
        ],
    ),
    "group_norm": (
        "GroupNorm_test",
        "test_3d_input_groups",
        [dict(N=0, C=8, H=5, W=4, num_groups=4), dict(N=3, C=8, H=6, W=5, num_groups="C")],
    ),
}


def _opacus_tests() -> Path:
    import opacus

    return Path(opacus.__file__).parent / "tests"


def _available(cuda: bool):
    """The suites that can run here (the CUDA ones, or the others): their file is in the
    installed Opacus, what they need is here."""
    tests = _opacus_tests()
    return [
        name
        for name, (file, _) in SUITES.items()
        if (name in CUDA_SUITES) == cuda and (tests / file).is_file() and (name not in NEEDS or _has(NEEDS[name]))
    ]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """Runs the available suites that need no GPU once, in a subprocess; returns its report."""
    return _run_suites(tmp_path_factory, _available(cuda=False))


@pytest.fixture(scope="module")
def cuda_suite_run(tmp_path_factory):
    """The same for the suites whose tests need CUDA (only GPU tests ask for it)."""
    return _run_suites(tmp_path_factory, _available(cuda=True))


def _run_suites(tmp_path_factory, names):
    tmp = tmp_path_factory.mktemp("opacus_suite")
    report = tmp / "report.json"
    if not names:
        pytest.skip("this Opacus ships none of the test files (opacus/tests)")
    cmd = [sys.executable, str(Path(__file__).resolve()), str(report), str(EXAMPLES), *names]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp)
    elapsed = time.perf_counter() - start
    output = proc.stdout[-20000:] + proc.stderr[-10000:]
    assert report.is_file(), f"the suite runner wrote no report (exit {proc.returncode}):\n{output}"
    result = json.loads(report.read_text())
    result.update(output=output, elapsed=elapsed, names=names)
    print(f"Opacus suites ({len(names)} files, max_examples={EXAMPLES}): {elapsed:.0f} s")
    return result


@pytest.mark.parametrize("suite", [pytest.param(s, marks=pytest.mark.cuda) if s in CUDA_SUITES else s for s in SUITES])
def test_opacus_suite_passes_with_our_samplers(request, suite):
    suite_run = request.getfixturevalue("cuda_suite_run" if suite in CUDA_SUITES else "suite_run")
    file, ours = SUITES[suite]
    if suite not in suite_run["names"]:
        pytest.skip(f"opacus/tests/{file} cannot run here (not in this Opacus, or {NEEDS.get(suite)} missing)")
    outcomes = {k: v for k, v in suite_run["outcomes"].items() if k.split("::")[0].endswith(file)}
    failed = sorted(k for k, v in outcomes.items() if v == "failed")
    assert not failed, f"{len(failed)} of Opacus's tests failed with our backend: {failed}\n{suite_run['output']}"
    assert "passed" in outcomes.values(), f"no test of {file} passed: {outcomes}\n{suite_run['output']}"
    calls = suite_run["counts"].get(file, {})
    missing = [s for s in ours if not calls.get(s)]
    assert not missing, f"{file}: our samplers {missing} were never called (calls: {calls})"


def test_opacus_suite_run_was_clean(suite_run):
    """pytest.main's exit status: nothing failed outside a test either (collection, an error)."""
    assert suite_run["exit"] == 0, suite_run["output"]
    assert not suite_run["errors"], suite_run["errors"]


# ---------------------------------------------------------------- the subprocess


def _pin_examples(names):
    """Adds PINNED's cases to Opacus's tests (imported here as pytest will import them: by
    their package name, so pytest finds these very functions)."""
    import importlib

    from hypothesis import example

    common = importlib.import_module("opacus.tests.grad_samples.common")
    mappers = {"expander": common.expander, "shrinker": common.shrinker}
    for name in names:
        if name not in PINNED:
            continue
        cls, test, cases = PINNED[name]
        module = importlib.import_module("opacus.tests." + SUITES[name][0][: -len(".py")].replace("/", "."))
        fn = getattr(getattr(module, cls), test)
        for case in cases:
            if "out_channels_mapper" in case:
                case = dict(case, out_channels_mapper=mappers[case["out_channels_mapper"]])
            example(**case)(fn)


def _run(report: str, examples: int, names: list) -> int:
    import torch
    from hypothesis import settings

    import indivgrad_cuda.opacus as ig_opacus

    # loaded before pytest imports Opacus's test modules, so their @settings(deadline=...) inherit it
    settings.register_profile("indivgrad-opacus", max_examples=examples, derandomize=True, database=None)
    settings.load_profile("indivgrad-opacus")

    _pin_examples(names)
    tests = _opacus_tests()
    files = {str(tests / SUITES[name][0]): SUITES[name][0] for name in names}
    counts, outcomes, errors, current = {}, {}, [], {"file": None}

    def counting(fn, key):
        def sampler(*args, **kwargs):
            per_file = counts.setdefault(current["file"], {})
            per_file[key] = per_file.get(key, 0) + 1
            return fn(*args, **kwargs)

        return sampler

    for module_type, (grad, norm) in list(ig_opacus.SAMPLERS.items()):
        name = module_type.__name__
        ig_opacus.SAMPLERS[module_type] = (
            counting(grad, f"{name}.grad"),
            None if norm is None else counting(norm, f"{name}.norm"),
        )
    ig_opacus.install()
    torch.manual_seed(0)  # Opacus's tests draw their data unseeded

    class Recorder:
        def pytest_runtest_setup(self, item):
            current["file"] = files.get(str(item.path))

        def pytest_runtest_logreport(self, report):
            if report.failed:
                outcomes[report.nodeid] = "failed"
            elif report.skipped:
                outcomes.setdefault(report.nodeid, "skipped")
            elif report.when == "call":
                outcomes.setdefault(report.nodeid, "passed")

        def pytest_collectreport(self, report):
            if report.failed:
                errors.append(f"{report.nodeid}: {report.longreprtext[-3000:]}")

    ini = Path(report).with_name("pytest.ini")
    ini.write_text("[pytest]\n")
    args = [*files, "-c", str(ini), "--rootdir", str(tests.parent.parent), "-p", "no:cacheprovider", "-q"]
    args += ["--disable-warnings", "-rfE", "--hypothesis-profile", "indivgrad-opacus"]
    code = pytest.main(args, plugins=[Recorder()])
    assert ig_opacus.is_installed()
    Path(report).write_text(json.dumps({"exit": int(code), "counts": counts, "outcomes": outcomes, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
