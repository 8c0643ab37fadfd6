"""bench/gpu_check.sh, the one command for a GPU session, tested without a GPU: its plan
(--dry-run), its argument errors, and its bookkeeping (statuses, budgets, logs, summary,
archive) with stand-ins for python and compute-sanitizer that only print and exit."""

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = [
    "build",
    "env",
    "wheels",
    "tests",
    "sanitizer-memcheck",
    "sanitizer-racecheck",
    "sanitizer-initcheck",
    "sanitizer-synccheck",
    "kernels",
    "profile",
    "run",
    "attribution",
    "dp",
    "dp-step",
]
TOOLS = ["memcheck", "racecheck", "initcheck", "synccheck"]
NINE_MINUTES = 540  # one 10-minute device command, with a minute to spare
DEVICE_DEADLINE = 570  # what a full run on the device is given: its whole plan no longer fits

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and GNU timeout"
)


def gpu_check(*args, **env):
    """Runs the script; the environment is this one less the script's own variables, plus env."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GPU_CHECK_", "FAKE_")) and k not in ("COMPUTE_SANITIZER", "NSIGHT_COMPUTE")
    }
    full_env["PYTHON"] = sys.executable
    full_env.update({k: str(v) for k, v in env.items()})
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=full_env, timeout=120
    )


def worst_case(stdout):
    return int(re.search(r"worst case (\d+) s", stdout).group(1))


def fake_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "fake-1.0-py3-none-any.whl").write_bytes(b"")
    return wheels


def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("pre_commit") is None, reason="needs pre-commit (make test and make lint install it)"
)
def test_shellcheck():
    """The script passes shellcheck, as pinned and configured by .pre-commit-config.yaml's hook
    (which `make lint` also runs over every shell script)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "shellcheck", "--color", "never", "--files", str(SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "shellcheck (shell lint)" in proc.stdout, proc.stdout + proc.stderr
    assert "(no files to check)" not in proc.stdout, proc.stdout


def test_dry_run_plans_every_step_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check(out, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout
    for step in STEPS:
        if step != "wheels":
            assert re.search(rf"\] {step}: budget \d+ s", plan), step
    assert "] wheels: skipped (no --wheels DIR)" in plan
    assert "pip install --no-index --no-build-isolation --no-deps -v -e ." in plan
    assert "INDIVGRAD_CUDA=1" in plan and "bench/gpu_check.py verify-build" in plan
    tests = f"-m pytest -v -p no:cacheprovider -rfEs --durations=15 --junitxml {out}/tests-junit.xml"
    assert re.search(re.escape(tests) + r"( -n 6 --dist loadfile)? tests\n", plan)  # xdist where installed
    for tool in TOOLS:
        line = next(ln for ln in plan.splitlines() if f"--tool {tool} " in ln)
        assert "--error-exitcode 1" in line and "--target-processes all" in line
        assert "tests/test_ops.py" in line and "-k 'not 2_31'" in line and "-m cuda" in line
        assert ("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in line) == (tool in ("memcheck", "initcheck"))
        # initcheck must see torch's kernels write, or every tensor they wrote reads as uninitialised
        assert ("--kernel-name kns=indivgrad" in line) == (tool in ("racecheck", "synccheck"))
    profile = next(ln for ln in plan.splitlines() if "bench/ncu_outer.py" in ln)
    assert "--kernel-name regex:outer_kernel" in profile and f"--log-file {out}/ncu.csv" in profile
    assert f"bench/kernels.py --device cuda --layouts out_in in_out --results-dir {out}/results --quiet --all\n" in plan
    assert f"bench/run.py --device cuda --results-dir {out}/results --quiet --all\n" in plan
    assert f"bench/attribution_digits.py --device cuda --results-dir {out}/results --quiet\n" in plan
    for model in ("mlp", "sequence"):
        dp = f"bench/dp_sgd_digits.py --model {model} --device cuda --processes 0 --results-dir {out}/results --quiet\n"
        assert dp in plan, model
    dp_step = "bench/dp_step.py --device cuda --setups bert gpt2 --precisions float32 bf16 --results-dir"
    assert f"{dp_step} {out}/results --quiet\n" in plan  # issue 28's DP-SGD step: both setups, both precisions
    assert re.search(r"\] dp-step: budget (\d+) s", plan).group(1) == "120"
    assert "--quick" not in plan and "--deadline" not in plan
    assert not out.exists()


def test_dry_run_with_a_deadline(tmp_path):
    proc = gpu_check(tmp_path / "out", "--dry-run", "--deadline", DEVICE_DEADLINE)
    assert proc.returncode == 0, proc.stderr
    assert worst_case(proc.stdout) > DEVICE_DEADLINE  # the plan is cut: its rest is a second call
    header = f"--deadline {DEVICE_DEADLINE} s: budgets cut to the time left, no step starts with under 30 s"
    assert header in proc.stdout


def test_dry_run_quick_with_wheels(tmp_path):
    wheels = fake_wheels(tmp_path)
    full = gpu_check(tmp_path / "out", "--dry-run", "--wheels", wheels)
    proc = gpu_check(tmp_path / "out", "--dry-run", "--quick", "--wheels", wheels)
    assert full.returncode == 0 and proc.returncode == 0, full.stderr + proc.stderr
    plan = proc.stdout
    assert re.search(r"\] wheels: budget \d+ s", plan)
    assert f"pip install --no-index --no-deps --no-compile --no-cache-dir {wheels}/fake-1.0-py3-none-any.whl" in plan
    assert (
        "bench/kernels.py --device cuda --layouts out_in in_out --results-dir" in plan
        and "--quick --no-compile\n" in plan
    )
    assert re.search(r"bench/run\.py --device cuda --results-dir \S+ --quiet --quick\n", plan)
    attribution = r"bench/attribution_digits\.py --device cuda --results-dir \S+ --quiet --epochs 20 .*--repeats 1\n"
    assert re.search(attribution, plan)
    assert (
        len(re.findall(r"bench/dp_sgd_digits\.py --model \w+ .* --quiet --epochs 1\n", plan)) == 3
    )  # mlp, sequence, cnn
    assert re.search(
        r"bench/dp_step\.py --device cuda --setups bert gpt2 --precisions float32 bf16 .* --quiet --quick\n", plan
    )
    assert re.search(r"\] dp-step: budget 45 s", plan)
    selections = {tool: re.search(rf"--tool {tool} .* -k ('[^']*')", plan).group(1) for tool in TOOLS}
    assert selections["memcheck"] != selections["racecheck"] == selections["initcheck"] == selections["synccheck"]
    assert all("not 2_31" in k for k in selections.values())
    assert worst_case(plan) <= NINE_MINUTES < worst_case(full.stdout)  # the wheels included


def test_only_budget_and_serial(tmp_path):
    proc = gpu_check(
        tmp_path / "out",
        "--dry-run",
        "--only",
        "build,sanitizer-memcheck,sanitizer-racecheck",
        "--budget",
        "sanitizer-racecheck=7",
        "--budget=build=11",
        "--serial",
    )
    assert proc.returncode == 0, proc.stderr
    assert "] tests: skipped (not in --only)" in proc.stdout
    assert "] sanitizer-racecheck: budget 7 s" in proc.stdout and "] build: budget 11 s" in proc.stdout
    memcheck = int(re.search(r"\] sanitizer-memcheck: budget (\d+) s", proc.stdout).group(1))
    assert worst_case(proc.stdout) == 11 + memcheck + 7  # one after another


def test_help():
    proc = gpu_check("--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--dry-run" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing OUTDIR"),
        (["--dry-run", "--quick"], "missing OUTDIR"),
        (["OUT", "--frobnicate"], "unknown option '--frobnicate'"),
        (["OUT", "--wheels"], "--wheels needs a directory"),
        (["OUT", "--wheels", "--dry-run"], "--wheels needs a directory"),
        (["OUT", "--wheels", "MISSING"], "--wheels: no such directory"),
        (["OUT", "--wheels", "EMPTY"], "--wheels: no .whl files"),
        (["OUT", "OTHER"], "unexpected argument"),
        (["OUT", "--only", "build,bogus"], "--only: unknown step 'bogus'"),
        (["OUT", "--budget", "tests=abc"], "--budget tests: seconds must be a positive integer"),
        (["OUT", "--budget", "nosuch=5"], "--budget wants STEP=SECONDS"),
        (["OUT", "--deadline"], "--deadline needs SECONDS"),
        (["OUT", "--deadline", "0"], "--deadline: seconds must be a positive integer (got '0')"),
        (["OUT", "--deadline=9.5"], "--deadline: seconds must be a positive integer (got '9.5')"),
        (["OUT", "--archive", "OUT/inside.tar.gz"], "--archive must be outside OUTDIR"),
    ],
)
def test_bad_arguments_fail_with_a_message(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    names = {
        "OUT": tmp_path / "out",
        "MISSING": tmp_path / "missing",
        "EMPTY": tmp_path / "EMPTY",
        "OTHER": tmp_path / "other",
    }
    args = [str(names[a]) if a in names else a.replace("OUT/", f"{tmp_path / 'out'}/") for a in args]
    proc = gpu_check(*args, "--dry-run")
    assert proc.returncode == 2
    assert f"gpu_check.sh: error: {message}" in proc.stderr and "usage:" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ real runs with stand-ins

FAKE_PYTHON = """#!/usr/bin/env bash
echo "fake python $*"
case "$*" in
  *"pip install"*"-e ."*) exit "${FAKE_BUILD_RC:-0}" ;;
  *"gpu_check.py verify-build"*) echo "build check ok"; exit 0 ;;
  *bench/kernels.py*) sleep "${FAKE_KERNELS_SLEEP:-0}" ;;
  *"-m pytest"*) echo "3 passed, 1 skipped in 0.01s"; exit "${FAKE_PYTEST_RC:-0}" ;;
esac
exit 0
"""

FAKE_SANITIZER = """#!/usr/bin/env bash
echo "fake sanitizer $*"
[[ $1 == --version ]] && exit 0
tool=memcheck
while [[ $1 == --* ]]; do [[ $1 == --tool ]] && tool=$2; shift 2; done
"$@"; rc=$?
if [[ $tool == "${FAKE_SANITIZER_FAILS:-none}" ]]; then echo "========= ERROR SUMMARY: 2 errors"; exit 1; fi
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


FAKE_NCU = """#!/usr/bin/env bash
echo "fake ncu $*"
while [[ $1 == --* ]]; do
  case $1 in
    --csv) shift ;;
    --log-file) echo '"ID","Kernel Name"' >"$2"; shift 2 ;;
    *) shift 2 ;;
  esac
done
"$@"
"""


@pytest.fixture
def fakes(tmp_path):
    paths = {}
    for name, text in (("python", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER), ("ncu", FAKE_NCU)):
        path = tmp_path / "fakes" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        paths[name] = path
    return dict(PYTHON=paths["python"], COMPUTE_SANITIZER=paths["compute-sanitizer"], NSIGHT_COMPUTE=paths["ncu"])


def summary(out):
    """step -> (status, seconds, budget, note) from steps.tsv."""
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return {r[0]: tuple(r[1:]) for r in rows}


def test_failures_and_timeouts_are_recorded_and_later_steps_still_run(tmp_path, fakes):
    out, archive = tmp_path / "out", tmp_path / "gpu_check.tar.gz"
    proc = gpu_check(
        out,
        "--wheels",
        fake_wheels(tmp_path),
        "--budget",
        "kernels=1",
        "--archive",
        archive,
        FAKE_SANITIZER_FAILS="racecheck",
        FAKE_KERNELS_SLEEP=30,
        **fakes,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary(out)
    assert {s: rows[s][0] for s in STEPS} == {
        "build": "ok",
        "env": "ok",
        "wheels": "ok",
        "tests": "ok",
        "sanitizer-memcheck": "ok",
        "sanitizer-racecheck": "FAILED",
        "sanitizer-initcheck": "ok",
        "sanitizer-synccheck": "ok",
        "kernels": "TIMEOUT",
        "profile": "ok",
        "run": "ok",
        "attribution": "ok",
        "dp": "ok",
        "dp-step": "ok",
    }
    assert rows["tests"][3] == "3 passed, 1 skipped in 0.01s"
    assert "ERROR SUMMARY: 2 errors" in rows["sanitizer-racecheck"][3]
    assert float(rows["kernels"][1]) < 20 and rows["kernels"][2] == "1"
    for step in STEPS:
        assert (out / f"{step}.log").exists(), step
    assert "fake python bench/run.py --device cuda" in (out / "run.log").read_text()
    assert "fake python bench/attribution_digits.py --device cuda" in (out / "attribution.log").read_text()
    assert (out / "dp.log").read_text().count("fake python bench/dp_sgd_digits.py --model") == 3
    assert "fake python bench/dp_step.py --device cuda --setups bert gpt2" in (out / "dp-step.log").read_text()
    assert "--kernel-name regex:outer_kernel" in (out / "profile.log").read_text()
    assert (out / "ncu.csv").exists()
    assert "TIMEOUT" in (out / "kernels.log").read_text()
    assert "## nvcc --version" in (out / "env.txt").read_text()
    # the console: the failed steps' last lines, then the table, then the verdict last
    lines = proc.stdout.rstrip().splitlines()
    assert "FAILED: sanitizer-racecheck kernels" in lines[-1]
    table = max(i for i, line in enumerate(lines) if re.match(r"step +status +seconds +budget", line))
    assert [line.split()[0] for line in lines[table + 1 :] if not line.startswith(" ")][:-1] == STEPS
    tails = [i for i, line in enumerate(lines) if line.startswith("---- ")]
    assert [lines[i].split(":")[0] for i in tails] == ["---- sanitizer-racecheck FAILED", "---- kernels TIMEOUT"]
    assert max(tails) < table
    assert (out / "summary.txt").read_text().rstrip().splitlines()[-1] == lines[-1]
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"out/summary.txt", "out/steps.tsv", "out/env.txt", "out/sanitizer-racecheck.log"} <= names


def test_a_failed_build_skips_what_needs_it(tmp_path, fakes):
    out = tmp_path / "out"
    proc = gpu_check(out, "--quick", FAKE_BUILD_RC=1, **fakes)
    assert proc.returncode == 1
    rows = summary(out)
    assert rows["build"][0] == "FAILED" and rows["env"][0] == "ok" and rows["wheels"][0] == "skipped"
    for step in STEPS[3:]:
        assert rows[step][0] == "skipped" and rows[step][3] == "the build failed", step
    assert "---- build FAILED: the last lines of" in proc.stdout


def test_all_ok_exits_zero(tmp_path, fakes):
    out = tmp_path / "out"
    proc = gpu_check(out, "--quick", "--only", "tests,sanitizer-memcheck,run", **fakes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].endswith("every step that ran is ok")
    rows = summary(out)
    assert [s for s in STEPS if rows[s][0] == "ok"] == ["tests", "sanitizer-memcheck", "run"]
    log = (out / "tests.log").read_text()
    assert "-m cuda" in log  # quick: the GPU tests only (the `cuda` marker)


@pytest.mark.skipif(
    not (shutil.which("g++") and shutil.which("readelf") and Path("/usr/bin/g++").exists()),
    reason="needs g++, /usr/bin/g++ and readelf",
)
def test_pick_compiler_passes_over_one_that_links_libstdcxx_statically(tmp_path):
    """The H200 image's default g++ linked libstdc++ statically (C++ errors then crashed Python):
    the build step must pick another compiler, and keep a default that links it dynamically."""
    static = tmp_path / "static-g++"
    static.write_text('#!/bin/sh\nexec g++ "$@" -static-libstdc++\n')
    static.chmod(static.stat().st_mode | stat.S_IXUSR)
    script = str(ROOT / "bench" / "gpu_check.py")
    for cxx, chosen in ((static, "CXX=/usr/bin/g++\nCC=/usr/bin/gcc\n"), (shutil.which("g++"), "")):
        out = tmp_path / "compiler.env"
        env = {**os.environ, "CXX": str(cxx)}
        proc = subprocess.run(
            [sys.executable, script, "pick-compiler", str(out)], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert out.read_text() == chosen, proc.stdout
    assert "links libstdc++ dynamically" in proc.stdout


def test_the_deadline_cuts_budgets_and_names_the_steps_left(tmp_path, fakes):
    """With --deadline, a step gets at most the time left (less timeout's kill grace), a step
    left under GPU_CHECK_MIN_LEFT does not start, and the end names the command that runs the
    steps left; that command works."""
    out, wheels = tmp_path / "out", fake_wheels(tmp_path)
    only = "build,wheels,kernels,profile,run,dp"
    common = dict(GPU_CHECK_MIN_LEFT=3, **fakes)
    proc = gpu_check(out, "--only", only, "--deadline", 15, "--wheels", wheels, FAKE_KERNELS_SLEEP=30, **common)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = summary(out)
    assert rows["build"][0] == rows["wheels"][0] == "ok" and rows["kernels"][0] == "TIMEOUT"
    assert 3 <= int(rows["kernels"][2]) <= 10 and float(rows["kernels"][1]) < 15  # cut from its 40 s
    for step in ("profile", "run", "dp"):
        assert rows[step][0] == "no-time" and rows[step][3].startswith("--deadline 15 s:"), rows[step]
        assert not (out / f"{step}.log").exists()
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].endswith("FAILED: kernels; NO TIME LEFT for: profile run dp")
    rerun = next(line for line in lines if line.startswith("to run the steps left: "))
    expected = f"bash bench/gpu_check.sh {out}-rest --only build,wheels,profile,run,dp --wheels {wheels} --deadline 15"
    assert rerun == "to run the steps left: " + expected
    args = expected.split()[2:]
    again = gpu_check(*args, **common)
    assert again.returncode == 0, again.stdout + again.stderr
    ran = [s for s, row in summary(Path(f"{out}-rest")).items() if row[0] == "ok"]
    assert ran == ["build", "wheels", "profile", "run", "dp"]


def test_the_gpu_selection_holds_every_gpu_test():
    """gpu_check.sh selects the GPU tests by `-m cuda`: that collects those whose names do not
    say cuda and no CPU param; and a test that needs a GPU says so only by the marker (a skipif
    of its own would keep it out of the selection), which conftest.py turns into the skip."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = {line for line in proc.stdout.splitlines() if "::" in line}
    for gpu_only in (
        "tests/test_privacy_distributed.py::test_nccl_group_on_one_gpu",
        "tests/test_op_errors.py::test_device_mismatch",
        "tests/test_engine_errors.py::test_generator_on_cpu_for_a_cuda_model",
        "tests/test_engine_graphs.py::test_deep_float32_net_graphs_equal_eager[cuda]",
        "tests/test_ops.py::test_outer_matches_reference[cuda-dtype0-in_out]",
    ):
        assert gpu_only in ids, gpu_only
    assert not [i for i in ids if "[cpu" in i]
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text() if path != Path(__file__) else ""
        for gate in ("CUDA_OK", "cuda.is_available()"):
            assert gate not in text, f"{path.name} gates on {gate}: mark the test @pytest.mark.cuda instead"
