"""End-to-end DP-SGD with Opacus on scikit-learn's digits (shipped with the package, no
download), with and without indivgrad_cuda as Opacus's nn.Linear backend.

    python bench/dp_sgd_digits.py [--epochs 10] [--device cpu|cuda]

Prints the per-step time of each run, final test accuracy and epsilon, and checks that both
backends give the same per-sample gradients on the first batch.
"""

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import indivgrad_cuda.opacus as ig_opacus  # noqa: E402


def load_data(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return (x_tr.to(device), y_tr.to(device)), (x_te.to(device), y_te.to(device))


def make_model():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def first_batch_grad_samples(model, x, y, backend):
    from opacus import GradSampleModule

    with (ig_opacus.installed() if backend else _opacus_own()):
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


def train(model, train_data, test_data, backend, args, device):
    from opacus import PrivacyEngine

    torch.manual_seed(args.seed)
    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train_data), batch_size=args.batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=args.noise_multiplier,
                                                   max_grad_norm=args.max_grad_norm)
    loss_fn = nn.CrossEntropyLoss()
    step_ms = []
    with (ig_opacus.installed() if backend else _opacus_own()):
        for _ in range(args.epochs):
            for xb, yb in loader:
                if len(xb) == 0:
                    continue
                common.sync(device)
                t0 = time.perf_counter()
                optimizer.zero_grad()
                loss_fn(model(xb), yb).backward()
                optimizer.step()
                common.sync(device)
                step_ms.append((time.perf_counter() - t0) * 1e3)
    with torch.no_grad():
        acc = (model(test_data[0]).argmax(1) == test_data[1]).float().mean().item()
    return statistics.median(step_ms), acc, engine.get_epsilon(delta=args.delta), len(step_ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", module="opacus")  # its note on secure RNG
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus hooks on a leaf input
    train_data, test_data = load_data(device)
    torch.manual_seed(args.seed)
    model = make_model().to(device)

    xb, yb = train_data[0][: args.batch_size], train_data[1][: args.batch_size]
    ours, theirs = (first_batch_grad_samples(model, xb, yb, backend) for backend in (True, False))
    diff = max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in theirs)
    print(f"first batch ({len(xb)} samples): per-sample gradients, indivgrad vs Opacus's own: "
          f"max relative difference {diff:.1e}")

    print(f"DP-SGD on digits ({len(train_data[0])} train / {len(test_data[0])} test), {args.epochs} epochs, "
          f"batch {args.batch_size}, noise {args.noise_multiplier}, clip {args.max_grad_norm}, {common.device_name(device)}")
    print(f"  {'backend':<22} {'ms/step (median)':>17} {'steps':>6} {'test acc':>9} {'epsilon':>8}")
    results = {}
    for label, backend in (("opacus (its einsum)", False), ("opacus + indivgrad", True)):
        ms, acc, eps, steps = train(model, train_data, test_data, backend, args, device)
        results[label] = ms
        print(f"  {label:<22} {ms:>17.3f} {steps:>6} {acc:>9.3f} {eps:>8.2f}")
    ratio = results["opacus (its einsum)"] / results["opacus + indivgrad"]
    print(f"  indivgrad backend: {ratio:.2f}x the step rate of Opacus's own sampler")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
