"""The benches run (quick mode, on CPU and, where a GPU is usable, on CUDA), check every
method and write their CSV and plots, so they cannot rot; their console stays clean: tables
on stdout, a progress bar on stderr (nothing with --quiet), no peer's warnings."""

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {  # the CSV columns every row must have (bench/common.py writes them)
    "date",
    "commit",
    "device",
    "torch",
    "cuda",
    "bench",
    "setup",
    "method",
    "median_ms",
    "ratio_vs_summed",
    "peak_mem_mb",
    "gbps",
    "roofline_pct",
    "max_rel_err",
}


def run_bench(script, tmp_path, device, *extra):
    """Runs bench/script on device with its rows into tmp_path; checks its console and rows."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / script),
            "--device",
            device,
            "--results-dir",
            str(tmp_path),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\r" not in proc.stdout and "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    if "--quiet" in extra:
        assert proc.stderr == ""
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) >= REQUIRED
    assert all(r["device"].startswith("CPU ") == (device == "cpu") for r in rows), "rows name the wrong device"
    return proc, rows


def test_run_quick(tmp_path, device):
    proc, rows = run_bench("run.py", tmp_path, device, "--quick")
    out = proc.stdout
    assert "tfm:4x8x32x1 opacus" in proc.stderr  # the progress bar names the running method
    timed = {r["method"] for r in rows if r["median_ms"]}
    assert {"summed", "indivgrad", "indivgrad_norms", "indivgrad_clipped", "seed_bmm", "torch_func"} <= timed
    assert not [r for r in rows if "WRONG" in r["note"]]
    for r in rows:
        if r["median_ms"]:
            assert float(r["max_rel_err"]) < 1e-3 and float(r["ratio_vs_summed"]) > 0 and float(r["peak_mem_mb"]) >= 0
    assert (tmp_path / f"run_{_slug(rows[0]['device'])}.png").exists()
    assert "[N, D, L] = [16, 20, 3]" in out and "transformer [N, T, d_model, layers] = [4, 8, 32, 1]" in out
    for setup in ("tfm:4x8x32x1", "resmlp:8x16x2"):  # any-model setups: the hooks capture against Opacus, torch.func
        timed_here = {r["method"] for r in rows if r["setup"] == setup and r["median_ms"]}
        assert {"summed", "indivgrad", "indivgrad_norms", "indivgrad_clipped", "torch_func"} <= timed_here
        assert all(float(r["roofline_pct"]) > 0 for r in rows if r["setup"] == setup and r["method"] == "indivgrad")


def test_norms_quick(device):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "norms.py"), "--quick", "--device", device, "--n", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Linear 16 -> 24" in proc.stdout and "Embedding 50 x 8" in proc.stdout


def test_kernels_quick(tmp_path, device):
    _, rows = run_bench(
        "kernels.py",
        tmp_path,
        device,
        "--quick",
        "--no-compile",
        "--layouts",
        "out_in",
        "in_out",
        "--dtypes",
        "float32",
        "bfloat16",
        "--quiet",
    )
    methods = {r["method"] for r in rows}
    assert {
        "roofline_fill",
        "roofline_fill_words",
        "roofline_copy",
        "indivgrad_outer",
        "indivgrad_act_outer",
        "bmm",
        "broadcast_mul",
    } <= methods
    assert {r["setup"] for r in rows} == {
        "16x33x17/float32",
        "16x33x17/bfloat16",
        "16x33x17/float32/in_out",
        "16x33x17/bfloat16/in_out",
    }
    assert all(float(r["gbps"]) > 0 for r in rows)
    for setup in {r["setup"] for r in rows}:  # % of the faster fill: the best fill is 100
        fills = [
            float(r["roofline_pct"]) for r in rows if r["setup"] == setup and r["method"].startswith("roofline_fill")
        ]
        assert abs(max(fills) - 100) < 1e-9
    assert not [r for r in rows if "WRONG" in r["note"]]
    assert list(tmp_path.glob("kernels_*.png"))


def _slug(device):
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()


def test_rows_record_gpu_check_commit_where_set(monkeypatch):
    """The device machine's .git can be older than the tree it runs, so gpu_check.sh's
    GPU_CHECK_COMMIT names the commit in every row."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    import common

    monkeypatch.setenv("GPU_CHECK_COMMIT", "0123456789abcdef")
    assert common.run_context(torch.device("cpu"))["commit"] == "0123456"
    monkeypatch.delenv("GPU_CHECK_COMMIT")
    assert common.run_context(torch.device("cpu"))["commit"] != "0123456"


def test_profile_engine_quick(device):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "profile_engine.py"),
            *("--device", device, "--setup", "tfm:2,4,16,1", "--calls", "1", "--top", "3"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("  indivgrad")}
    assert set(rows) == {"indivgrad", "indivgrad_norms", "indivgrad_clipped"}, proc.stdout
    summed_ms = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("  summed")))
    layers = int(re.search(r"\((\d+) layers with trainable parameters", proc.stdout).group(1))
    assert layers == 10  # one block: two Embeddings, three LayerNorms, qkv, proj, fc1, fc2, the head
    for name, (ms, ratio, extra, busy) in rows.items():
        assert float(ms) > 0 and float(ratio) > 0, (name, ms, ratio)
        want = (float(ms) - summed_ms) * 1e3 / layers  # the engine's µs per layer over the summed step
        rounding = 0.005 * (float(ms) + summed_ms) * 1e3 / layers  # each printed to 3 significant digits
        assert abs(float(extra) - want) <= rounding + 0.005 * abs(want), (name, extra, want)
        assert busy == "-" if device == "cpu" else float(busy) > 0, busy  # the kernels' time, on a GPU only
        assert f"## {name}: the top 3 by self_" in proc.stdout


def test_dp_sgd_digits_one_epoch(tmp_path):
    """The DP-SGD example: every method and variant trains on the same batches, to the same
    epsilon; the per-sample gradients agree (else exit 1), and the 2-process gloo runs,
    replicated and FSDP2-sharded, end where the single process does; one results.csv row per
    run."""
    proc, csv_rows = run_bench(
        "dp_sgd_digits.py", tmp_path, "cpu", "--epochs", "1", "--side-by-side-s", "0.1", "--quiet"
    )
    gloo = ("indivgrad DPSGD, 2 gloo processes", "indivgrad DPSGD, 2 gloo processes, FSDP2")
    _check_dp_sgd_digits(proc, csv_rows, (*DP_METHODS, *gloo))
    for run in gloo:
        label = run[len("indivgrad DPSGD, ") :]
        match = re.search(
            rf"{re.escape(label)} against one process on cpu: final weights' max relative difference (\S+),",
            proc.stdout,
        )
        assert match and float(match.group(1)) < 1e-3, proc.stdout


def test_dp_sgd_digits_cnn_one_epoch(tmp_path):
    """The DP-SGD example's CNN (convolutions and GroupNorm): the same checks, without the
    gloo runs (kept fast)."""
    proc, csv_rows = run_bench(
        "dp_sgd_digits.py",
        tmp_path,
        "cpu",
        *("--model", "cnn", "--epochs", "1", "--processes", "0", "--side-by-side-s", "0.1", "--quiet"),
    )
    assert "DP-SGD on digits, cnn model" in proc.stdout, proc.stdout
    _check_dp_sgd_digits(proc, csv_rows, DP_METHODS)


OPACUS_METHODS = ("opacus hooks", "opacus ghost clipping", "opacus + indivgrad backend")
DP_METHODS = (
    *OPACUS_METHODS,
    "indivgrad DPSGD",
    "indivgrad DPSGD, per-layer",
    "indivgrad DPSGD, automatic",
    "indivgrad DPSGD, adaptive",
)


def _check_dp_sgd_digits(proc, csv_rows, methods):
    """One epoch of dp_sgd_digits.py: every method in its table and rows, the same steps and
    epsilon, Opacus's three modes the same training up to rounding (the same noise)."""
    table = {}
    for line in proc.stdout.splitlines():
        m = re.fullmatch(r"  (\S.*?)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            table[m.group(1)] = [float(v) for v in m.groups()[1:]]
    assert sorted(table) == sorted(methods), proc.stdout
    assert {row[2] for row in table.values()} == {11.0}, proc.stdout  # steps: one epoch of 11 Poisson batches
    assert len({row[4] for row in table.values()}) == 1, proc.stdout  # one epsilon: same rate, steps and noise level
    accuracy = [table[m][3] for m in OPACUS_METHODS]
    assert max(accuracy) - min(accuracy) <= 0.01, proc.stdout  # the same training up to float rounding
    rows = {row["method"]: row for row in csv_rows if row["bench"] == "dp_sgd"}
    assert sorted(rows) == sorted(methods)
    # then each variant's step on one batch, timed in turns: a row and a ratio to flat's each
    steps = {row["method"]: float(row["median_ms"]) for row in csv_rows if row["bench"] == "dp_sgd_step"}
    variants = [m for m in DP_METHODS if m.startswith("indivgrad DPSGD")]
    assert sorted(steps) == sorted(variants) and len(csv_rows) == len(rows) + len(steps), csv_rows
    line = re.search(
        r"DPSGD's variants side by side, one step on 122 samples timed in turns: flat (\S+) ms; (.*)", proc.stdout
    )
    assert line and float(line.group(1)) == pytest.approx(steps["indivgrad DPSGD"], rel=1e-3), proc.stdout
    for variant in variants[1:]:
        ratio = steps[variant] / steps["indivgrad DPSGD"]
        assert f"{variant[len('indivgrad DPSGD, ') :]} {ratio:.2f}x" in line.group(2), (line.group(2), steps)
    for name, row in rows.items():
        assert float(row["median_ms"]) == pytest.approx(table[name][0], rel=1e-3, abs=1e-3), (name, row)
        assert f"test acc {table[name][3]:.3f}; epsilon {table[name][4]:.2f}" in row["note"], row


def test_attribution_digits_smoke(tmp_path, device):
    """The attribution example: TracIn self-influence finds more flipped labels than chance,
    and every method's inner products and projections match float64 (else exit 1); on CUDA
    the Gram kernel sweep's rows (kernel and GEMMs, five shapes) follow."""
    proc, rows = run_bench(
        "attribution_digits.py",
        tmp_path,
        device,
        *("--epochs", "20", "--checkpoint-every", "10", "--train-sizes", "300"),
        *("--test-size", "40", "--dims", "128", "--repeats", "1", "--quiet"),
    )
    methods = {
        "indivgrad inner_products",
        "torch.func grads + matmul",
        "dattri TracInAttributor (no projection)",
        "torch.func grads @ dense matrix",
        "torch.func + traker BasicProjector",
        "torch.func + dattri random_project",
    }
    for method in methods:
        assert f" {method} " in proc.stdout, proc.stdout
    assert all(float(r["max_rel_err"]) < 1e-3 for r in rows), rows
    assert [r["bench"] for r in rows] == ["attribution"] * 7 + ["gram_kernel"] * (10 if device == "cuda" else 0)
    found = re.search(r"TracIn self-influence \(exact\)\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    assert found and float(found.group(2)) > 0.4, proc.stdout


def test_attribution_lds_smoke(tmp_path, device):
    """The estimators' bench in a few seconds of training: every estimator's LDS is reported
    (ours and the peers' on the same model), and every timed result matched its float64
    reference first (else exit 1): ours, Kronfluence's, dattri's and traker's."""
    estimators = "ours-tracin,ours-trak,ours-kfac,ours-ekfac,kronfluence-kfac,kronfluence-ekfac,dattri-trak,traker-trak"
    proc, rows = run_bench(
        "attribution_lds.py",
        tmp_path,
        device,
        *("--models", "4", "--lds-test", "20", "--kinds", "mlp", "--epochs", "5", "--estimators", estimators),
        *("--train-sizes", "200", "--test-size", "20", "--repeats", "1", "--quiet"),
    )
    labels = [e.replace("-", " ") for e in estimators.split(",")]
    lds_rows = {r["method"]: r for r in rows if r["bench"] == "attribution_lds"}
    speed_rows = {r["method"]: r for r in rows if r["bench"] == "attribution_speed"}
    assert sorted(lds_rows) == sorted(labels) and sorted(speed_rows) == sorted(labels), proc.stdout
    assert all(float(r["max_rel_err"]) < 1e-3 for r in speed_rows.values()), speed_rows
    for label in labels:
        assert re.search(rf"  {label} +-?[\d.]+ +\[", proc.stdout), proc.stdout  # an LDS and its interval


HF_TIMED = {"summed", "indivgrad", "indivgrad_norms", "indivgrad_clipped", "torch_func", "opacus", "opacus_ghost"}


@pytest.mark.parametrize(
    "setup, title",
    [
        (
            "gpt2:2,8,64,1,100",
            "GPT-2-shaped LM, lm_head tied to wte [N, T, n_embd, layers, vocab] = [2, 8, 64, 1, 100]",
        ),
        (
            "llama:2,8,64,1,100",
            "Llama-shaped LM, grouped-query attention [N, T, hidden, layers, vocab] = [2, 8, 64, 1, 100]",
        ),
        ("vit:2,32,64,1", "ViT-S/16-shaped classifier [N, image size, hidden, layers] = [2, 32, 64, 1]"),
    ],
    ids=["gpt2", "llama", "vit"],
)
def test_run_hugging_face_setups(tmp_path, device, setup, title):
    """The Hugging Face setups (GPT-2 with its tied head, Llama with GQA, ViT), tiny: every
    method's result right and timed, Opacus's ghost clipping on GPT-2's untied copy."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
    pytest.importorskip("opacus", reason="opacus is not installed (pip install -e .[bench])")
    extra = ("--setups", setup, "--methods", *sorted(HF_TIMED), "--budget-s", "0.1", "--no-plot", "--quiet")
    proc, rows = run_bench("run.py", tmp_path, device, *extra)
    assert title in proc.stdout, proc.stdout
    timed = {r["method"]: r for r in rows if r["median_ms"]}
    assert set(timed) == HF_TIMED, proc.stdout
    for r in timed.values():
        assert float(r["max_rel_err"]) < 1e-3 and float(r["ratio_vs_summed"]) > 0 and float(r["peak_mem_mb"]) >= 0
    untied = "on an untied copy" in timed["opacus_ghost"]["note"]
    assert untied == setup.startswith("gpt2"), timed["opacus_ghost"]
    for method in ("indivgrad_clipped", "opacus_ghost"):  # a transformer's clipped sums: against the FLOP bound
        assert re.search(r"[\d.]+x the FLOP bound \(1\.\d+x summed\)", timed[method]["note"]), timed[method]
    assert "x bound of the clipped sums: time over the FLOP bound" in proc.stdout, proc.stdout


def test_hugging_face_setups_are_sized_by_device():
    """hf, or a kind alone, takes HF_SETUPS' size for the device: full size on a GPU only."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    import run

    setups = [run.parse_setup(text) for text in ("hf", "vit", "gpt2:1,2,64,1,10")]
    for device in ("cpu", "cuda"):
        want = [(k, run.HF_SETUPS[k][device]) for k in ("gpt2", "llama", "vit", "vit")] + [("gpt2", (1, 2, 64, 1, 10))]
        assert run.device_setups(setups, torch.device(device)) == want
    assert run.HF_SETUPS["gpt2"]["cuda"] == (8, 512, 768, 12, 50257)  # GPT-2 small at T 512
    assert run.HF_SETUPS["vit"]["cuda"] == (32, 224, 384, 12)  # ViT-S/16 on 224 x 224 images


CNN_TIMED = HF_TIMED | {"backpack", "backpack_l2"}


@pytest.mark.parametrize(
    "setup, title",
    [
        ("cnn:2,8", "Opacus's CIFAR-10 example CNN [N, image size] = [2, 8]"),
        ("wrn:2,8,10,1", "WideResNet with GroupNorm [N, image size, depth, width factor] = [2, 8, 10, 1]"),
    ],
    ids=["cnn", "wrn"],
)
def test_run_cnn_setups(tmp_path, device, setup, title):
    """The CNN setups, tiny: every method's result right and timed, per-sample gradients with
    their x bound; BackPACK runs the CNN and is skipped, with its reason, on the WideResNet's
    GroupNorm."""
    pytest.importorskip("opacus", reason="opacus is not installed (pip install -e .[bench])")
    has_backpack = importlib.util.find_spec("backpack") is not None
    extra = ("--setups", setup, "--methods", *sorted(CNN_TIMED), "--budget-s", "0.1", "--no-plot", "--quiet")
    proc, rows = run_bench("run.py", tmp_path, device, *extra)
    assert title in proc.stdout, proc.stdout
    timed = {r["method"]: r for r in rows if r["median_ms"]}
    backpack_runs = has_backpack and setup.startswith("cnn")
    assert set(timed) == (CNN_TIMED if backpack_runs else HF_TIMED), proc.stdout
    for r in timed.values():
        assert float(r["max_rel_err"]) < 1e-3 and float(r["ratio_vs_summed"]) > 0 and float(r["peak_mem_mb"]) >= 0
    assert all(float(timed[m]["roofline_pct"]) > 0 for m in timed if m in ("indivgrad", "torch_func", "opacus"))
    if has_backpack and setup.startswith("wrn"):
        notes = {r["method"]: r["note"] for r in rows}
        assert notes["backpack"] == "skipped: BackPACK's BatchGrad has no rule for GroupNorm", notes
        assert notes["backpack_l2"] == "skipped: BackPACK's BatchL2Grad has no rule for GroupNorm", notes


def test_cnn_setups_are_sized_by_device():
    """cnns, or cnn or wrn alone, takes CNN_SETUPS' size for the device; a WideResNet's depth
    is 6n + 4."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import torch

    import run

    setups = [run.parse_setup(text) for text in ("cnns", "wrn", "cnn:3,16")]
    for device in ("cpu", "cuda"):
        want = [(k, run.CNN_SETUPS[k][device]) for k in ("cnn", "wrn", "wrn")] + [("cnn", (3, 16))]
        assert run.device_setups(setups, torch.device(device)) == want
    assert run.CNN_SETUPS["cnn"]["cuda"] == (256, 32) and run.CNN_SETUPS["wrn"]["cuda"] == (256, 32, 16, 4)
    for bad in ("wrn:2,8,12,1", "wrn:2,8,4,1", "cnn:2,4", "cnn:2"):
        with pytest.raises(argparse.ArgumentTypeError):
            run.parse_setup(bad)


def test_fsdp_step_smoke():
    """The FSDP2 step bench: four modes timed on 2 gloo processes, and the two ratios."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fsdp_step.py"), "--steps", "2", "--warmup", "1", "--batch", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    times = dict(re.findall(r"^  (\S.*?)\s+([\d.]+) ms$", proc.stdout, re.M))
    assert sorted(times) == sorted(["FSDP2 plain step", "DPSGD on FSDP2", "DDP plain step", "DPSGD on replicas"])
    assert all(float(v) > 0 for v in times.values()), proc.stdout
    assert re.search(r"DPSGD against the plain step: [\d.]+x sharded, [\d.]+x replicated", proc.stdout), proc.stdout


def test_lora_dp_sgd_two_steps():
    """The LoRA DP-SGD example: two steps print a loss, an epsilon that grows and a step time."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e .[bench])")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lora_dp_sgd.py"), "--steps", "2", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    steps = [
        line.split()
        for line in proc.stdout.splitlines()
        if re.fullmatch(r"\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+", line)
    ]
    assert [int(s[0]) for s in steps] == [1, 2], proc.stdout
    assert 0 < float(steps[0][3]) < float(steps[1][3]), proc.stdout  # epsilon grows with the steps
    assert "LoRA r=4" in proc.stdout and "2 steps: median" in proc.stdout, proc.stdout


def test_bench_runs_the_headline_setups_and_bench_all_the_sweep():
    """`make bench` (the defaults) runs the headline setups, about 4 minutes on 2 CPU cores: the
    seed's [32, 300, 50] and [1000, 100, 10], the smallest transformer, the CIFAR-10 CNN at the
    device's size, and the kernels' large shapes; `make bench-all` (--all) the whole sweep,
    which holds them. --quick, --all and --setups each choose: one at a time."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import torch

    import kernels
    import run

    def choice(**kw):
        return argparse.Namespace(**{"setups": None, "quick": False, "all": False, **kw})

    for device in ("cpu", "cuda"):
        dev = torch.device(device)
        default, full = run.chosen_setups(choice(), dev), run.chosen_setups(choice(all=True), dev)
        cnn = ("cnn", run.CNN_SETUPS["cnn"][device])
        assert default == [("mlp", (32, 300, 50)), ("mlp", (1000, 100, 10)), ("tfm", (32, 64, 128, 2)), cnn]
        want = run.SEED_SETUPS + run.MODEL_SETUPS + [cnn, ("wrn", run.CNN_SETUPS["wrn"][device])]
        assert full == want + (run.GPU_SETUPS if device == "cuda" else [])
        assert set(default) <= set(full)
        assert run.chosen_setups(choice(quick=True), dev) == run.QUICK_SETUPS
        sweep = kernels.GPU_SHAPES if device == "cuda" else kernels.CPU_SHAPES
        assert kernels.chosen_shapes(choice(all=True), dev) == sweep
        assert kernels.chosen_shapes(choice(), dev) == kernels.LARGE[device] and set(kernels.LARGE[device]) <= set(
            sweep
        )
    for main, flags in (
        (run.main, ["--all", "--quick"]),
        (run.main, ["--all", "--setups", "cnn"]),
        (kernels.main, ["--all", "--quick"]),
    ):
        with pytest.raises(SystemExit) as e:
            main(flags)
        assert e.value.code == 2
    recipes = (ROOT / "Makefile").read_text()
    assert "bench-all: $(BUILT)\n\t$(PY) bench/run.py --all\n\t$(PY) bench/kernels.py --all\n" in recipes
    assert "bench: $(BUILT)\n\t$(PY) bench/run.py\n\t$(PY) bench/kernels.py\n" in recipes


def test_flop_bound_against_a_hand_count():
    """bench/flop_bound.py: the non-private step is 3x the forward's FLOPs, each layer's norm the
    cheaper of T^2 (D_in + D_out) and T D_in D_out multiply-adds per sample (an Embedding: D_in
    1), 2 FLOPs each; counted by hand on an Embedding and two Linears."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from torch import nn

    from flop_bound import flop_bound, flop_counts

    n, t = 3, 5
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = nn.Sequential(nn.Embedding(50, 8), mlp)
    count = flop_counts(model, (torch.randint(0, 50, (n, t)),))
    assert count.forward_flops == 2 * n * t * (8 * 16 + 16 * 4) == 5760  # the Linears' GEMMs; no FLOP in a lookup
    assert count.step_flops == 3 * 5760
    forms = [(layer.name, layer.t, layer.d_in, layer.d_out, layer.form, layer.flops) for layer in count.layers]
    assert forms == [
        ("0", t, 1, 8, "direct", 2 * n * t * 8),  # direct 5*8 = 40 against ghost 25*9 = 225
        ("1.0", t, 8, 16, "ghost", 2 * n * t * t * 24),  # ghost 25*24 = 600 against direct 5*128 = 640
        ("1.2", t, 16, 4, "direct", 2 * n * t * 16 * 4),  # direct 5*64 = 320 against ghost 25*20 = 500
    ]
    assert count.norm_flops == 2 * n * (40 + 600 + 320) == 5760 and count.uncounted == []
    assert count.ratio == flop_bound(model, (torch.randint(0, 50, (n, t)),)) == (17280 + 5760) / 17280
    # one row per sample ([N, D_in]): T = 1, the ghost form, D_in + D_out
    flat = flop_counts(mlp, torch.randn(n, 8))
    assert flat.forward_flops == 2 * n * (8 * 16 + 16 * 4) == 1152
    assert [layer.flops for layer in flat.layers] == [2 * n * 24, 2 * n * 20]
    assert flat.ratio == (3 * 1152 + 2 * n * 44) / (3 * 1152)
    # a frozen layer has no norm to take; a parameter of a kind no rule counts is named
    mlp[0].weight.requires_grad_(False)
    assert [layer.name for layer in flop_counts(mlp, torch.randn(n, 8)).layers] == ["2"]

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bil = nn.Linear(8, 4), nn.Bilinear(4, 4, 2)

        def forward(self, x):
            h = self.lin(x)
            return self.bil(h, h)

    assert flop_counts(Pair(), torch.randn(n, 8)).uncounted == ["bil.weight"]


def test_dp_step_quick(tmp_path):
    """bench/dp_step.py on tiny BERT and GPT-2 models, float32 and bf16: DPSGD's update checked
    against the non-private step's (else exit 1), every step timed, against the FLOP bound and
    Opacus's ghost clipping (on GPT-2's untied copy)."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
    has_opacus = importlib.util.find_spec("opacus") is not None
    proc, rows = run_bench("dp_step.py", tmp_path, "cpu", "--quick", "--quiet")
    out = proc.stdout
    assert "BERT-shaped classifier, 2 classes [N, T, D, layers, vocab] = [2, 8, 64, 1, 100]" in out, out
    assert "GPT-2-shaped LM, lm_head tied to wte [N, T, D, layers, vocab] = [2, 8, 64, 1, 100]" in out, out
    assert {r["bench"] for r in rows} == {"dp_step"}
    setups = [f"{kind}:2x8x64x1x100/{precision}" for kind in ("bert", "gpt2") for precision in ("float32", "bf16")]
    assert sorted({r["setup"] for r in rows}) == sorted(setups)
    by = {(r["setup"], r["method"]): r for r in rows}
    for setup in setups:
        step, dp, ghost = (by[setup, m] for m in ("non-private", "indivgrad DPSGD", "opacus ghost"))
        assert float(step["ratio_vs_summed"]) == 1 and float(dp["ratio_vs_summed"]) > 0
        assert float(dp["max_rel_err"]) < (1e-4 if setup.endswith("float32") else 5e-2), dp
        bound = float(re.search(r"FLOP bound ([\d.]+)x", dp["note"]).group(1))
        assert 1 < bound < 1.5, dp["note"]
        x_bound = float(dp["ratio_vs_summed"]) / bound
        assert float(dp["roofline_pct"]) == pytest.approx(100 / x_bound, rel=1e-2), dp
        assert bool(ghost["median_ms"]) == has_opacus, ghost
        if has_opacus:
            speedup = float(ghost["median_ms"]) / float(dp["median_ms"])
            assert f"{speedup:.3g}x faster than Opacus ghost" in dp["note"], dp["note"]
            assert ("on an untied copy" in ghost["note"]) == setup.startswith("gpt2"), ghost
    assert out.count("  targets, ") == 4, out
