"""End-to-end DP-SGD on scikit-learn's digits (shipped with the package, no download):
Opacus with its own samplers, Opacus with indivgrad_cuda as its nn.Linear backend, and
indivgrad_cuda's own engine (PerSampleGrads.clipped_grad_sum: one forward, one backward,
no per-sample gradient in memory) with Opacus's Poisson sampling and accountant.

    python bench/dp_sgd_digits.py [--model mlp|sequence] [--epochs 10] [--device cpu|cuda]

--model mlp: a 64-256-256-10 MLP on the flattened 8x8 images (10 epochs, lr 0.1).
--model sequence: each image as 8 tokens (its rows) of 8 features into a small transformer
encoder (tests/models.py: FeatureEncoder, d_model 32, 2 heads, 1 block; 20 epochs, lr 0.5).
Both: SGD with momentum 0.9, expected batch 128. Prints the per-step time of each run, final
test accuracy and epsilon (same noise, sampling rate and steps), and first checks that all
three give the same per-sample gradients (or norms) on the first batch.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
from torch import nn

import common
import console
import indivgrad_cuda as ig
import indivgrad_cuda.opacus as ig_opacus
from tests.models import FeatureEncoder


def load_data(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (x_tr.to(device), y_tr.to(device)), (x_te.to(device), y_te.to(device))


def make_model(kind):
    if kind == "sequence":
        return FeatureEncoder(8, d_model=32, heads=2, layers=1, max_len=8, classes=10)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def as_model_input(x, kind):
    return x.view(-1, 8, 8) if kind == "sequence" else x


def first_batch_grad_samples(model, x, y, backend):
    from opacus import GradSampleModule

    with ig_opacus.installed() if backend else _opacus_own():
        gsm = GradSampleModule(copy.deepcopy(model))
        nn.CrossEntropyLoss()(gsm(x), y).backward()
        grads = {k: p.grad_sample.clone() for k, p in gsm._module.named_parameters()}
        gsm._close()
    return grads


class _opacus_own:
    """Opacus's own samplers for the duration of the block."""

    def __enter__(self):
        self.was = ig_opacus.is_installed()
        ig_opacus.uninstall()

    def __exit__(self, *exc):
        if self.was:
            ig_opacus.install()


def _setup(model, train_data, args, device):
    """The same model copy, optimiser and (shuffled, seeded) loader for every method."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*train_data),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    return model, optimizer, loader


def _timed_steps(loader, step, args, device):
    """Runs step(xb, yb) over every non-empty batch of every epoch; the steps' times in ms."""
    step_ms = []
    for _ in range(args.epochs):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            common.sync(device)
            t0 = time.perf_counter()
            step(xb, yb)
            common.sync(device)
            step_ms.append((time.perf_counter() - t0) * 1e3)
    return step_ms


def _accuracy(model, test_data):
    with torch.no_grad():
        return (model(test_data[0]).argmax(1) == test_data[1]).float().mean().item()


def train(model, train_data, test_data, backend, args, device):
    """Opacus's make_private (its Poisson sampling, DPOptimizer and accountant), with or without
    indivgrad as its nn.Linear backend."""
    from opacus import PrivacyEngine

    model, optimizer, loader = _setup(model, train_data, args, device)
    engine = PrivacyEngine(accountant=args.accountant)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
    )
    loss_fn = nn.CrossEntropyLoss()

    def step(xb, yb):
        optimizer.zero_grad()
        loss_fn(model(xb), yb).backward()
        optimizer.step()

    with ig_opacus.installed() if backend else _opacus_own():
        step_ms = _timed_steps(loader, step, args, device)
    return statistics.median(step_ms), _accuracy(model, test_data), engine.get_epsilon(delta=args.delta), len(step_ms)


def train_engine(model, train_data, test_data, args, device):
    """DP-SGD with PerSampleGrads.clipped_grad_sum: Opacus's Poisson sampling, noise of std
    noise_multiplier * max_grad_norm added once per step, the sum divided by the expected
    batch size (as Opacus's DPOptimizer does), and Opacus's accountant."""
    from opacus.accountants import create_accountant
    from opacus.data_loader import DPDataLoader

    model, optimizer, loader = _setup(model, train_data, args, device)
    loader = DPDataLoader.from_data_loader(loader)
    sample_rate = 1 / len(loader)
    expected_batch = len(train_data[0]) * sample_rate
    accountant = create_accountant(mechanism=args.accountant)
    engine = ig.PerSampleGrads(model)
    loss_fn = nn.CrossEntropyLoss()

    def step(xb, yb):
        engine.clipped_grad_sum(xb, yb, loss_fn, args.max_grad_norm, noise_multiplier=args.noise_multiplier)
        for p in model.parameters():
            p.grad.div_(expected_batch)
        optimizer.step()
        accountant.step(noise_multiplier=args.noise_multiplier, sample_rate=sample_rate)

    step_ms = _timed_steps(loader, step, args, device)
    return (
        statistics.median(step_ms),
        _accuracy(model, test_data),
        accountant.get_epsilon(delta=args.delta),
        len(step_ms),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "sequence"], default="mlp")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, help="default: 10 (mlp), 20 (sequence)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, help="default: 0.1 (mlp), 0.5 (sequence)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accountant", default="prv", help="Opacus's accountant (its make_private default: prv)")
    console.add_quiet_flag(parser)
    args = parser.parse_args(argv)
    console.silence_peer_warnings()
    defaults = {"mlp": (10, 0.1), "sequence": (20, 0.5)}[args.model]
    args.epochs = defaults[0] if args.epochs is None else args.epochs
    args.lr = defaults[1] if args.lr is None else args.lr
    device = torch.device(args.device)
    (x_tr, y_tr), (x_te, y_te) = load_data(device)
    train_data, test_data = (as_model_input(x_tr, args.model), y_tr), (as_model_input(x_te, args.model), y_te)
    torch.manual_seed(args.seed)
    model = make_model(args.model).to(device)

    xb, yb = train_data[0][: args.batch_size], train_data[1][: args.batch_size]
    ours, theirs = (first_batch_grad_samples(model, xb, yb, backend) for backend in (True, False))
    engine = ig.PerSampleGrads(model)(xb, yb, nn.CrossEntropyLoss())
    diff = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in theirs)
    diff_engine = max(((engine[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in theirs)
    print(
        f"first batch ({len(xb)} samples): per-sample gradients against Opacus's own samplers, max relative "
        f"difference: Opacus + indivgrad backend {diff:.1e}, indivgrad engine {diff_engine:.1e}"
    )

    print(
        f"DP-SGD on digits, {args.model} model ({len(train_data[0])} train / {len(test_data[0])} test), "
        f"{args.epochs} epochs, expected batch {args.batch_size}, noise {args.noise_multiplier}, clip "
        f"{args.max_grad_norm}, {common.device_name(device)}"
    )
    print(f"  {'method':<26} {'ms/step (median)':>17} {'steps':>6} {'test acc':>9} {'epsilon':>8}")
    results = {}
    runs = (
        ("opacus (its own samplers)", lambda: train(model, train_data, test_data, False, args, device)),
        ("opacus + indivgrad backend", lambda: train(model, train_data, test_data, True, args, device)),
        ("indivgrad engine", lambda: train_engine(model, train_data, test_data, args, device)),
    )
    progress = console.Progress(len(runs), args.quiet, unit="method")
    for label, run in runs:
        progress.start(f"training with {label}")
        ms, acc, eps, steps = run()
        results[label] = ms
        with progress.paused():
            print(f"  {label:<26} {ms:>17.3f} {steps:>6} {acc:>9.3f} {eps:>8.2f}")
    progress.close()
    base = results["opacus (its own samplers)"]
    print(
        f"  step rate against Opacus's own: backend {base / results['opacus + indivgrad backend']:.2f}x, "
        f"engine {base / results['indivgrad engine']:.2f}x"
    )
    return 0 if max(diff, diff_engine) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
