"""The data-attribution estimators of other libraries, one function each, on any classifier
and data, with the dense float64 references that check them (and ours, in attribution_lds.py).

Every estimator takes (model, train=(inputs, labels), test=(inputs, labels), options) and
returns Result(scores [N_train, N_test], fit_ms, score_ms), the scores in one sign
convention: positive when training on the sample raises the test sample's margin (logit of
the label minus the logsumexp of the others) or lowers its loss. Kronfluence scores
g_measᵀ (H + λ)⁻¹ g_train (measurement: the loss or -margin, as its classification example);
TRAK (dattri, traker) projects margin gradients and weights by 1 - p; TracIn sums
lr <∇loss_train, ∇loss_test> over checkpoints. The model passed is never changed.

- kronfluence (1.0.1): Analyzer.fit_all_factors (fit) and compute_pairwise_scores (score),
  FactorArguments(strategy "kfac" | "ekfac", use_empirical_fisher), ScoreArguments(
  damping_factor: None is its heuristic 0.1 x mean eigenvalue of each module; its own default
  is 1e-8, so we pass ours). Its Task: the training loss is the summed cross-entropy, at
  labels drawn from softmax(logits) when Kronfluence asks for sample=True (the true Fisher),
  as its examples do. It tracks nn.Linear and nn.Conv2d modules only (a LayerNorm, an
  Embedding get no score), its factors go through safetensors files in a temporary folder.
- dattri (0.3.0): TRAKAttributor (cache = fit, attribute = score; its "normal" projector of
  proj_dim, a margin target, 1 - p weights) and IFAttributorEKFAC (cache, attribute), over the
  nn.Linear modules. Its EK-FAC fits the Fisher on the same function that gives the test
  gradients, so it can only be the empirical Fisher of the loss, and its test gradients are
  loss gradients (-(1 - p) times the margin's: per test sample a positive factor, which no
  per-test rank correlation such as the LDS sees). Its damping is one number for every layer;
  with options.damping None we add Kronfluence's heuristic, 0.1 x the mean of each layer's
  eigenvalues, to its cached eigenvalues (the same definition as Kronfluence's and ours).
  TracIn: attribution_digits.dattri_inner_products at each checkpoint, times its lr.
- traker (0.3.2): TRAKer(task="image_classification") with its BasicProjector ("normal",
  float32; the CudaProjector needs fast_jl), float32 storage (use_half_precision=False; its
  default float16 would not pass a 1e-3 check), one model id per checkpoint; load_checkpoint,
  featurize and finalize_features (fit), start_scoring_checkpoint, score and finalize_scores
  (score). Note its finalize_features scales each checkpoint's (XᵀX)⁻¹ by 1 / mean|(XᵀX)⁻¹|:
  with one checkpoint a constant factor, with several a weighting of the checkpoints that
  ours and dattri's (a plain mean) do not have.

References (float64, torch.func per-sample gradients):
- dense_influence: K-FAC / EK-FAC from their definitions (Kronfluence 1.0.1's): per nn.Linear
  A = sum a'a'ᵀ / rows (a' the input with a 1 appended for the bias), S = sum g gᵀ / rows (g
  the output gradient of each sample's summed loss; rows = samples x positions), from forward
  and backward hooks; eigenbases by eigh; K-FAC Λ = sigma alphaᵀ (the eigenvalues of S and
  A); EK-FAC Λ = mean_n (U_gᵀ W_n U_a)² from the per-sample gradients W_n = [dW | db];
  damping 0.1 x mean(Λ) per layer when None; every other parameter a diagonal
  Λ = mean_n w_n² (cover="all", our library's rule) or none (cover="linear", Kronfluence's
  and dattri's). The empirical Fisher (fit labels) only: the true Fisher's labels are random
  draws no reference can replay.
- dense_trak: per checkpoint Φ (projected margin gradients), Ψ = Φ (ΦᵀΦ + λ)⁻¹, Q = 1 - p;
  scores mean_c(Ψ_c φ_cᵀ) x mean_c(Q_c); the projection given as a function (traker's and
  dattri's matrices read from their BasicProjector's seeded blocks, ours from
  Projection.matrices), traker's normalization optional.
- dense_tracin: sum_c lr_c G_train,c G_test,cᵀ.

    python bench/peers_attribution.py [--device cpu|cuda]   # each wrapper against its reference, tiny models

Prints each check's max |difference| / max |reference| and exits 1 if one exceeds 1e-3
(the known differences of a peer are printed, not counted: see KNOWN).
"""

import argparse
import contextlib
import copy
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the checkout and tests/
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import common
import console
from tests.reference import func_module_grads

TOLERANCE = 1e-3
HEURISTIC_DAMPING = 0.1  # Kronfluence's HEURISTIC_DAMPING_SCALE


@dataclass
class Options:
    """What the estimators take beside the model and data (each reads the fields it needs)."""

    strategy: str = "ekfac"  # influence: "ekfac" | "kfac"
    fisher: str = "true"  # influence: "true" (labels drawn from the model) | "empirical"
    damping: Optional[float] = None  # influence: None = 0.1 x mean eigenvalue of each layer
    measurement: str = "margin"  # influence: "margin" (-margin measured) | "loss"
    proj_dim: int = 2048  # TRAK
    regularization: float = 0.0  # TRAK: added to ΦᵀΦ
    seed: int = 0
    checkpoints: Optional[list] = None  # TRAK, TracIn: state dicts; None: the model as it is
    learning_rates: object = 1.0  # TracIn: one per checkpoint, or one for all
    batch_size: int = 1000  # training samples per batch (the test set is one batch)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Result(NamedTuple):
    scores: torch.Tensor  # [N_train, N_test]
    fit_ms: float  # 0 where the estimator has no fitting step
    score_ms: float


def margin(logits, y):
    """logit_y - logsumexp_{k != y} logit_k, per sample [N] (TRAK's and Kronfluence's margin)."""
    correct = logits.gather(1, y[:, None])[:, 0]
    return correct - logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)


def _checkpoints(model, options):
    return options.checkpoints or [{k: v.detach().clone() for k, v in model.state_dict().items()}]


def _lrs(options, n):
    lr = options.learning_rates
    return [float(lr)] * n if isinstance(lr, (int, float)) else [float(v) for v in lr]


class _Clock:
    """Wall time of the blocks run under it, in ms, CUDA synchronized."""

    def __init__(self, device):
        self.device, self.ms = device, {}

    @contextlib.contextmanager
    def __call__(self, name):
        common.sync(self.device)
        t0 = time.perf_counter()
        yield
        common.sync(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def _loader(data, batch):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*data), batch_size=max(1, batch), shuffle=False)


# ---------------------------------------------------------------- Kronfluence


def _kronfluence_task(measurement):
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Kronfluence's classification example: summed cross-entropy, labels drawn from the
        model's softmax when sample=True; the measurement -margin (or the loss)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            if measurement == "loss":
                return F.cross_entropy(logits, y, reduction="sum")
            return -margin(logits, y).sum()

    return ClassificationTask()


def kronfluence(model, train, test, options):
    """Kronfluence's K-FAC or EK-FAC influence (options.strategy, fisher, damping, measurement)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    task = _kronfluence_task(options.measurement)
    clock = _Clock(options.device)
    with tempfile.TemporaryDirectory() as tmp, _quiet_kronfluence():
        prepared = prepare_model(copy.deepcopy(model), task)  # it freezes and wraps modules in place
        analyzer = Analyzer(
            analysis_name="bench",
            model=prepared,
            task=task,
            cpu=options.device.type == "cpu",
            disable_tqdm=True,
            output_dir=tmp,
            log_level=logging.WARNING,
        )
        train_set, test_set = TensorDataset(*train), TensorDataset(*test)
        factor_args = FactorArguments(strategy=options.strategy, use_empirical_fisher=options.fisher == "empirical")
        with clock("fit"):
            analyzer.fit_all_factors(
                factors_name=options.strategy,
                dataset=train_set,
                per_device_batch_size=min(len(train_set), options.batch_size),
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
        with clock("score"):
            analyzer.compute_pairwise_scores(
                scores_name="scores",
                factors_name=options.strategy,
                query_dataset=test_set,
                train_dataset=train_set,
                per_device_query_batch_size=len(test_set),
                per_device_train_batch_size=min(len(train_set), options.batch_size),
                score_args=ScoreArguments(damping_factor=options.damping),
                overwrite_output_dir=True,
            )
            scores = analyzer.load_pairwise_scores("scores")["all_modules"].t().contiguous()  # [N_query, N_train]
    return Result(scores, clock.ms["fit"], clock.ms["score"])


@contextlib.contextmanager
def _quiet_kronfluence():
    """Kronfluence logs through `logging` and accelerate; both kept at warnings for the call."""
    loggers = [logging.getLogger(n) for n in ("kronfluence", "accelerate", "bench")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------- dattri


def _quiet_dattri():
    """dattri draws a tqdm bar per batch; the tables would drown in them."""
    import dattri.algorithm.base as base
    import dattri.algorithm.influence_function as influence_function
    import dattri.algorithm.trak as trak_module

    for module in (base, influence_function, trak_module):
        if hasattr(module, "tqdm"):
            module.tqdm = lambda it, **kw: it


def _one(x, y):
    """A sample as a batch of one (dattri's functions are vmapped over samples)."""
    return (x[None], y[None]) if y.dim() == 0 else (x, y)


def dattri_trak(model, train, test, options):
    """dattri's TRAKAttributor over options.checkpoints (one projection per checkpoint)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    _quiet_dattri()
    m = copy.deepcopy(model).eval()

    def f(params, data):  # the margin of one sample
        x, y = _one(*data)
        return margin(functional_call(m, params, (x,)), y).sum()

    def p(params, data):  # the probability of its label
        x, y = _one(*data)
        return torch.softmax(functional_call(m, params, (x,)), -1).gather(1, y[:, None]).sum()

    task = AttributionTask(loss_func=f, model=m, checkpoints=_checkpoints(model, options))
    attributor = TRAKAttributor(
        task,
        correct_probability_func=p,
        projector_kwargs=dattri_projector_kwargs(options),
        device=str(options.device),
        regularization=options.regularization,
    )
    clock = _Clock(options.device)
    with clock("fit"):
        attributor.cache(_loader(train, options.batch_size))
    with clock("score"):
        scores = attributor.attribute(_loader(test, len(test[1])))
    return Result(scores, clock.ms["fit"], clock.ms["score"])


def dattri_projector_kwargs(options):
    # every key given: TRAKAttributor updates its module-level DEFAULT_PROJECTOR_KWARGS in place
    return {
        "proj_dim": options.proj_dim,
        "proj_max_batch_size": 32,
        "proj_seed": options.seed,
        "proj_type": "normal",
        "device": str(options.device),
    }


def dattri_ekfac(model, train, test, options):
    """dattri's IFAttributorEKFAC on the nn.Linear modules: the empirical Fisher of the
    cross-entropy (see the module's docs), loss gradients on both sides."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask

    _quiet_dattri()
    m = copy.deepcopy(model).eval()

    def loss(params, data):  # mean cross-entropy: one sample's under vmap, a batch's when fitting
        x, y = _one(*data)
        return F.cross_entropy(functional_call(m, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=m, checkpoints=m.state_dict())
    attributor = IFAttributorEKFAC(
        task, device=str(options.device), damping=0.0 if options.damping is None else options.damping
    )
    train_loader = _loader(train, options.batch_size)
    clock = _Clock(options.device)
    with clock("fit"):
        attributor.cache(train_loader)
        if options.damping is None:  # Kronfluence's heuristic, layer by layer
            for name, lam in attributor.cached_lambdas.items():
                attributor.cached_lambdas[name] = lam + HEURISTIC_DAMPING * lam.mean()
    with clock("score"):
        scores = attributor.attribute(train_loader, _loader(test, len(test[1])))
    return Result(scores, clock.ms["fit"], clock.ms["score"])


def dattri_tracin(model, train, test, options):
    """TracIn: dattri's TracInAttributor with its projection off (attribution_digits.py) at
    each checkpoint, times its learning rate."""
    from attribution_digits import dattri_inner_products

    m = copy.deepcopy(model).eval()
    ckpts = _checkpoints(model, options)
    batched = _AddBatchDim(m, train[0].dim() - 1)
    clock = _Clock(options.device)
    total = None
    with clock("score"):
        for ckpt, lr in zip(ckpts, _lrs(options, len(ckpts))):
            m.load_state_dict(ckpt)
            k = dattri_inner_products(batched, train, test, batch=options.batch_size) * lr
            total = k if total is None else total + k
    return Result(total, 0.0, clock.ms["score"])


class _AddBatchDim(nn.Module):
    """The model on one sample as dattri's vmapped functions pass it (no batch dim): the
    MLP takes that as it is, the sequence model's forward needs [N, T, D]."""

    def __init__(self, model, sample_dims):
        super().__init__()
        self.model, self.sample_dims = model, sample_dims

    def forward(self, x):
        return self.model(x[None])[0] if x.dim() == self.sample_dims else self.model(x)


# ---------------------------------------------------------------- traker


def traker_projector(model, options):
    from trak.projectors import BasicProjector, ProjectionType

    grad_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return BasicProjector(
        grad_dim=grad_dim,
        proj_dim=options.proj_dim,
        seed=options.seed,
        proj_type=ProjectionType.normal,
        device=options.device,
        dtype=torch.float32,
        # at least two blocks: with one (proj_dim <= its default block of 100) BasicProjector.project
        # reuses proj_matrix, which traker's finalize step frees (AttributeError; traker 0.3.2)
        block_size=min(100, max(1, options.proj_dim // 2)),
    )


def traker_trak(model, train, test, options):
    """traker's TRAKer over options.checkpoints (model ids 0, 1, ...: one projection each)."""
    import numpy as np
    from trak import TRAKer

    m = copy.deepcopy(model).eval()
    ckpts = _checkpoints(model, options)
    n, b = len(train[1]), options.batch_size
    clock = _Clock(options.device)
    with tempfile.TemporaryDirectory() as tmp, _quiet_traker():
        traker = TRAKer(
            model=m,
            task="image_classification",
            train_set_size=n,
            save_dir=tmp,
            device=str(options.device),
            projector=traker_projector(m, options),
            use_half_precision=False,
            logging_level=logging.ERROR,
            lambda_reg=options.regularization,
        )
        with clock("fit"):
            for c, ckpt in enumerate(ckpts):
                traker.load_checkpoint(ckpt, model_id=c)
                for i in range(0, n, b):
                    traker.featurize(
                        batch=(train[0][i : i + b], train[1][i : i + b]), num_samples=len(train[1][i : i + b])
                    )
            traker.finalize_features()
        with clock("score"):
            for c, ckpt in enumerate(ckpts):
                traker.start_scoring_checkpoint(exp_name="test", checkpoint=ckpt, model_id=c, num_targets=len(test[1]))
                traker.score(batch=test, num_samples=len(test[1]))
            scores = torch.from_numpy(np.array(traker.finalize_scores(exp_name="test")))  # a copy of its memmap
    return Result(scores, clock.ms["fit"], clock.ms["score"])


@contextlib.contextmanager
def _quiet_traker():
    """traker's finalize steps draw tqdm bars of their own."""
    import trak.traker as traker_module

    saved = traker_module.tqdm
    traker_module.tqdm = lambda it, **kw: it
    try:
        yield
    finally:
        traker_module.tqdm = saved


def basic_projector_matrix(projector, model_id):
    """[grad_dim, proj_dim]: the matrix traker's or dattri's BasicProjector multiplies by for
    a model id (ensemble id), read block by block from its own seeded generator states."""
    for attr in ("model_id", "ensemble_id"):
        if hasattr(projector, attr):
            setattr(projector, attr, model_id)
    projector.get_generator_states()
    generate = getattr(projector, "generate_sketch_matrix", None) or projector._gen_randomness_dense
    cols = []
    for i, state in enumerate(projector.generator_states):
        generate(state)
        width = min(projector.block_size, projector.proj_dim - i * projector.block_size)
        cols.append(projector.proj_matrix[:, :width].clone())
    return torch.cat(cols, 1)


def dattri_projector(model, options):
    """The BasicProjector dattri's random_project builds for this model's gradients."""
    from dattri.func.projection import ProjectionType, make_random_projector

    grad_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return make_random_projector(
        param_shape_list=[grad_dim],
        feature_batch_size=1,
        proj_dim=options.proj_dim,
        proj_max_batch_size=32,
        device=options.device,
        proj_seed=options.seed,
        proj_type=ProjectionType.normal,
        dtype=torch.float32,
    )


# ---------------------------------------------------------------- float64 references


def _as64(model):
    return copy.deepcopy(model).double().eval()


def _x64(x):
    return x.double() if x.is_floating_point() else x


def per_sample_grads(m64, x, y, fn, chunk=500):
    """{name: [N, numel]} float64 per-sample gradients of fn(output, label) (a per-sample
    value) by torch.func, chunk by chunk, in named_parameters() order."""
    parts = {}
    for i in range(0, len(y), chunk):
        g = func_module_grads(m64, _x64(x[i : i + chunk]), y[i : i + chunk], lambda o, t: fn(o, t).sum())
        for k, v in g.items():
            parts.setdefault(k, []).append(v.flatten(1))
    return {k: torch.cat(v) for k, v in parts.items()}


def _ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def _neg_margin(o, t):
    return -margin(o, t)


def _kron_layers(m64):
    """{module path: (weight name, bias name or None)} of the nn.Linear modules."""
    return {
        path: (
            f"{path}.weight" if path else "weight",
            (f"{path}.bias" if path else "bias") if mod.bias is not None else None,
        )
        for path, mod in m64.named_modules()
        if isinstance(mod, nn.Linear) and mod.weight.requires_grad
    }


def _kron_grad(grads, w_name, b_name, shape):
    """[N, D_out, D_in (+1)]: a Linear layer's per-sample [dW | db]."""
    w = grads[w_name].reshape(-1, *shape)
    return torch.cat([w, grads[b_name][:, :, None]], 2) if b_name else w


def covariances(m64, x, y, chunk=2000):
    """{path: (A, S)} of each nn.Linear, A = sum a'a'ᵀ / rows, S = sum g gᵀ / rows, g the output
    gradient of the summed cross-entropy at labels y (float64 forward and backward hooks)."""
    layers = _kron_layers(m64)
    sums = {p: [0.0, 0.0, 0] for p in layers}
    handles = []

    def hook(path):
        def forward(mod, inputs, out):
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if mod.bias is not None:
                a = torch.cat([a, a.new_ones(len(a), 1)], 1)
            sums[path][0] = sums[path][0] + a.t() @ a
            sums[path][2] += len(a)

            def backward(g):
                g = g.detach().reshape(-1, g.shape[-1])
                sums[path][1] = sums[path][1] + g.t() @ g

            out.register_hook(backward)

        return forward

    for path in layers:
        handles.append(m64.get_submodule(path).register_forward_hook(hook(path)))
    try:
        for i in range(0, len(y), chunk):
            F.cross_entropy(m64(_x64(x[i : i + chunk])), y[i : i + chunk], reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        m64.zero_grad(set_to_none=True)
    return {p: (s[0] / s[2], s[1] / s[2]) for p, s in sums.items()}


def dense_influence(model, fit, train, test, *, strategy, damping=None, measurement="loss", cover="linear", chunk=500):
    """float64 K-FAC / EK-FAC influence [N_train, N_test] with the empirical Fisher of ``fit``
    (see the module's docs); cover "linear" (nn.Linear only) or "all" (others diagonal)."""
    m64 = _as64(model)
    layers = _kron_layers(m64)
    shapes = {p: tuple(m64.get_submodule(p).weight.shape) for p in layers}
    in_kron = {n for w, b in layers.values() for n in (w, b) if n}
    diag = {}  # owning module path -> its other trainable parameters (one damping each, as ours)
    if cover == "all":
        for name, prm in m64.named_parameters():
            if prm.requires_grad and name not in in_kron:
                diag.setdefault(name.rpartition(".")[0], []).append(name)
    basis = {}
    for path, (a_cov, s_cov) in covariances(m64, *fit).items():
        alpha, u_a = torch.linalg.eigh(a_cov)
        sigma, u_g = torch.linalg.eigh(s_cov)
        basis[path] = (u_a, u_g, torch.outer(sigma, alpha))
    lam = dict.fromkeys(list(layers) + list(diag), 0.0)
    if strategy == "ekfac" or diag:
        n_fit = len(fit[1])
        for i in range(0, n_fit, chunk):
            g = per_sample_grads(m64, fit[0][i : i + chunk], fit[1][i : i + chunk], _ce, chunk)
            if strategy == "ekfac":
                for path, (w, b) in layers.items():
                    u_a, u_g, _ = basis[path]
                    lam[path] = lam[path] + (u_g.t() @ _kron_grad(g, w, b, shapes[path]) @ u_a).square().sum(0) / n_fit
            for path, names in diag.items():
                lam[path] = lam[path] + torch.cat([g[n] for n in names], 1).square().sum(0) / n_fit
    if strategy == "kfac":
        for path in layers:
            lam[path] = basis[path][2]
    inv = {p: 1.0 / (v + (HEURISTIC_DAMPING * v.mean() if damping is None else damping)) for p, v in lam.items()}
    meas = {"loss": _ce, "margin": _neg_margin}[measurement]
    gt = per_sample_grads(m64, *test, meas, chunk)
    pre = {}
    for path, (w, b) in layers.items():
        u_a, u_g, _ = basis[path]
        pre[path] = (u_g @ ((u_g.t() @ _kron_grad(gt, w, b, shapes[path]) @ u_a) * inv[path]) @ u_a.t()).flatten(1)
    for path, names in diag.items():
        pre[path] = torch.cat([gt[n] for n in names], 1) * inv[path]
    out = []
    for i in range(0, len(train[1]), chunk):
        g = per_sample_grads(m64, train[0][i : i + chunk], train[1][i : i + chunk], _ce, chunk)
        s = 0.0
        for path, (w, b) in layers.items():
            s = s + _kron_grad(g, w, b, shapes[path]).flatten(1) @ pre[path].t()
        for path, names in diag.items():
            s = s + torch.cat([g[n] for n in names], 1) @ pre[path].t()
        out.append(s)
    return torch.cat(out)


def flat(grads):
    return torch.cat(list(grads.values()), 1)


def dense_trak(model, checkpoints, train, test, project, *, regularization=0.0, traker_normalization=False, chunk=500):
    """float64 TRAK [N_train, N_test]: per checkpoint c, ``project(c, {name: [N, numel]})``
    of the margin gradients gives Φ_c and φ_c; mean_c Φ_c (Φ_cᵀΦ_c + λ)⁻¹ φ_cᵀ x mean_c (1 - p).
    traker_normalization: traker's Φ / sqrt(P) and (XᵀX)⁻¹ / mean|(XᵀX)⁻¹|."""
    projects = {"": (project, traker_normalization)}
    return dense_trak_many(model, checkpoints, train, test, projects, regularization=regularization, chunk=chunk)[""]


def dense_trak_many(model, checkpoints, train, test, projects, *, regularization=0.0, chunk=500):
    """dense_trak for several projections at once, {key: (project, traker_normalization)}
    -> {key: scores}: the float64 gradients are computed once for all of them."""
    total, q = dict.fromkeys(projects, 0.0), 0.0
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for c, ckpt in enumerate(checkpoints):
        m64 = _as64(model)
        m64.load_state_dict(ckpt)
        phi = {k: [] for k in projects}
        for i in range(0, len(train[1]), chunk):
            g = per_sample_grads(m64, train[0][i : i + chunk], train[1][i : i + chunk], margin, chunk)
            for k, (project, _) in projects.items():
                phi[k].append(project(c, g).double())
        g = per_sample_grads(m64, *test, margin, chunk)
        for k, (project, traker_normalization) in projects.items():
            f, f_t = torch.cat(phi[k]), project(c, g).double()
            if traker_normalization:
                f, f_t = f / math.sqrt(n_params), f_t / math.sqrt(n_params)
            xtx = f.t() @ f + regularization * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
            if traker_normalization:
                inv = torch.linalg.inv(xtx)
                total[k] = total[k] + f @ (inv / inv.abs().mean()) @ f_t.t()
            else:
                total[k] = total[k] + f @ torch.linalg.solve(xtx, f_t.t())
        with torch.no_grad():
            q = q + 1 - torch.softmax(m64(_x64(train[0])), -1).gather(1, train[1][:, None])[:, 0]
    n = len(checkpoints)
    return {k: (v / n) * (q / n)[:, None] for k, v in total.items()}


def dense_tracin(model, checkpoints, learning_rates, train, test, chunk=500):
    """float64 sum_c lr_c <∇loss_train, ∇loss_test> [N_train, N_test]."""
    total = 0.0
    for ckpt, lr in zip(checkpoints, learning_rates):
        m64 = _as64(model)
        m64.load_state_dict(ckpt)
        gt = flat(per_sample_grads(m64, *test, _ce, chunk))
        total = total + lr * torch.cat(
            [
                flat(per_sample_grads(m64, train[0][i : i + chunk], train[1][i : i + chunk], _ce, chunk)) @ gt.t()
                for i in range(0, len(train[1]), chunk)
            ]
        )
    return total


def matrix_projection(matrices):
    """project(c, grads) for dense matrices [P, k] (one per checkpoint), in float64."""
    mats = [m.double() for m in matrices]
    return lambda c, grads: flat(grads) @ mats[c].to(next(iter(grads.values())).device)


def traker_projection(model, options, n_checkpoints):
    """traker's matrices: model id c gets seeds seed + 1000 i + 100000 c (its BasicProjector)."""
    proj = traker_projector(model, options)
    return matrix_projection([basic_projector_matrix(proj, c) for c in range(n_checkpoints)])


def dattri_projection(model, options, n_checkpoints):
    """dattri's matrices: ensemble id c (checkpoint c), its BasicProjector's seeded blocks."""
    proj = dattri_projector(model, options)
    return matrix_projection([basic_projector_matrix(proj, c) for c in range(n_checkpoints)])


def rel_err(got, ref):
    got, ref = torch.as_tensor(got).double().cpu(), torch.as_tensor(ref).double().cpu()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- the registry the LDS bench uses

PEERS = {
    "kronfluence kfac": (kronfluence, dict(strategy="kfac")),
    "kronfluence ekfac": (kronfluence, dict(strategy="ekfac")),
    "dattri trak": (dattri_trak, {}),
    "dattri ekfac": (dattri_ekfac, dict(strategy="ekfac", fisher="empirical", measurement="loss")),
    "dattri tracin": (dattri_tracin, {}),
    "traker trak": (traker_trak, {}),
}


def run_peer(name, model, train, test, options):
    fn, overrides = PEERS[name]
    return fn(model, train, test, replace(options, **overrides))


# known differences of a peer from its definition, found by the checks below: printed, not failed
KNOWN = {
    "dattri ekfac": "dattri 0.3.0's IFAttributorEKFAC rotates by q_s @ v @ q_a.T with eigh's eigenvectors (its "
    "columns), the transposed basis, and reshapes [dW (flattened) | db] to [D_out, D_in + 1] without "
    "interleaving the bias column; 'dattri ekfac, fixed' patches both and matches",
    "dattri ekfac, sequences": "dattri 0.3.0's EK-FAC takes [N, D_in] layer inputs only: on [N, T, D_in] its "
    "covariance and eigenvalue updates read a_prev, set for 2-D inputs only (UnboundLocalError)",
    "dattri ekfac, fixed": "dattri eigendecomposes its float32 covariances in float32 (Kronfluence and ours in "
    "float64): about 6e-4 of the largest score at 2,000 samples, 1.1e-3 at 20,000, 8e-6 with a float64 eigh",
}


@contextlib.contextmanager
def dattri_ekfac_fixed():
    """dattri's IFAttributorEKFAC with its two slips (KNOWN) patched for the block: the
    eigenbases transposed after eigh (so its q_s @ v @ q_a.T is U_gᵀ v U_a), and each Linear's
    gradient laid out as [dW | db] column by column, and back."""
    import dattri.func.fisher as fisher
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    def eigenvectors(covariances, _orig=fisher.estimate_eigenvector):
        return {k: (q_a.T, q_s.T) for k, (q_a, q_s) in _orig(covariances).items()}

    def transform_test_rep(self, ckpt_idx, test_rep):
        params = {k: p for k, p in self.task.model.named_parameters() if p.requires_grad}
        reps, i = {}, 0
        for name in self.layer_name:
            size = params[name].numel()
            reps[name] = test_rep[:, i : i + size].reshape(-1, *params[name].shape)
            i += size
        out = []
        for name in self.module_name:
            has_bias = self.name_to_module[name].bias is not None
            v = reps[name + ".weight"]
            if has_bias:
                v = torch.cat([v, reps[name + ".bias"][:, :, None]], 2)
            q_a, q_s = self.cached_q[name]
            r = q_s.T @ ((q_s @ v @ q_a.T) / (self.cached_lambdas[name] + self.damping)) @ q_a
            out.append(torch.cat([r[:, :, :-1].flatten(1), r[:, :, -1]], 1) if has_bias else r.flatten(1))
        return torch.cat(out, 1)

    saved = fisher.estimate_eigenvector, IFAttributorEKFAC.transform_test_rep
    fisher.estimate_eigenvector, IFAttributorEKFAC.transform_test_rep = eigenvectors, transform_test_rep
    try:
        yield
    finally:
        fisher.estimate_eigenvector, IFAttributorEKFAC.transform_test_rep = saved


def dattri_ekfac_patched(model, train, test, options):
    with dattri_ekfac_fixed():
        return dattri_ekfac(model, train, test, options)


PEERS["dattri ekfac, fixed"] = (dattri_ekfac_patched, PEERS["dattri ekfac"][1])


# ---------------------------------------------------------------- the checks on tiny models


def _tiny(kind, device, seed=0):
    """A tiny model of each bench kind, a few SGD steps in, and its data."""
    from tests.models import FeatureEncoder

    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
        make = lambda n: (torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))  # noqa: E731
    else:
        torch.manual_seed(seed)
        model = FeatureEncoder(5, d_model=8, heads=2, layers=1, max_len=4, classes=4)
        make = lambda n: (torch.randn(n, 4, 5, generator=g), torch.randint(0, 4, (n,), generator=g))  # noqa: E731
    train, test = make(64), make(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = []
    for _ in range(3):
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(train[0]), train[1]).backward()
            opt.step()
        checkpoints.append({k: v.detach().clone().to(device) for k, v in model.state_dict().items()})
    model = model.to(device).eval()
    on = lambda d: tuple(t.to(device) for t in d)  # noqa: E731
    return model, on(train), on(test), checkpoints


def checks(device):
    """[(check, rel err, known difference or "")]: each peer wrapper against its reference."""
    rows = []
    for kind in ("mlp", "sequence"):
        model, train, test, ckpts = _tiny(kind, device)
        base = Options(seed=0, batch_size=32, device=device, proj_dim=16)
        for strategy in ("kfac", "ekfac"):
            for damping, measurement in ((1e-3, "loss"), (None, "margin")):
                opts = replace(base, strategy=strategy, fisher="empirical", damping=damping, measurement=measurement)
                got = kronfluence(model, train, test, opts).scores
                ref = dense_influence(
                    model, train, train, test, strategy=strategy, damping=damping, measurement=measurement
                )
                rows.append(
                    (f"{kind}: kronfluence {strategy}, damping {damping}, {measurement}", rel_err(got, ref), "")
                )
        for damping in (1e-3, None):
            opts = replace(base, strategy="ekfac", fisher="empirical", damping=damping, measurement="loss")
            ref = dense_influence(model, train, train, test, strategy="ekfac", damping=damping, measurement="loss")
            for name, fn in (("dattri ekfac", dattri_ekfac), ("dattri ekfac, fixed", dattri_ekfac_patched)):
                label = f"{kind}: {name}, damping {damping}"
                try:
                    got = fn(model, train, test, opts).scores
                except Exception as e:  # noqa: BLE001 - a peer failing on a model is a result to report
                    known = KNOWN["dattri ekfac, sequences"] if kind == "sequence" else ""
                    rows.append((label, float("nan"), known or f"fails: {type(e).__name__}: {str(e)[:70]}"))
                    continue
                err = rel_err(got, ref)
                rows.append((label, err, KNOWN["dattri ekfac"] if err > TOLERANCE and name == "dattri ekfac" else ""))
        opts = replace(base, checkpoints=ckpts)
        got = dattri_trak(model, train, test, opts).scores
        ref = dense_trak(model, ckpts, train, test, dattri_projection(model, opts, len(ckpts)))
        rows.append((f"{kind}: dattri trak, {len(ckpts)} checkpoints, dim 16", rel_err(got, ref), ""))
        got = traker_trak(model, train, test, opts).scores
        ref = dense_trak(
            model, ckpts, train, test, traker_projection(model, opts, len(ckpts)), traker_normalization=True
        )
        rows.append((f"{kind}: traker trak, {len(ckpts)} checkpoints, dim 16", rel_err(got, ref), ""))
        opts = replace(base, checkpoints=ckpts, learning_rates=[0.1, 0.2, 0.3])
        got = dattri_tracin(model, train, test, opts).scores
        ref = dense_tracin(model, ckpts, [0.1, 0.2, 0.3], train, test)
        rows.append((f"{kind}: dattri tracin, {len(ckpts)} checkpoints", rel_err(got, ref), ""))
    return rows


def silence():
    """The benches' known warnings, and Kronfluence's FutureWarning on each call (its GradScaler)."""
    import warnings

    console.silence_peer_warnings()
    warnings.filterwarnings("ignore", message=".*GradScaler", category=FutureWarning)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    silence()
    device = torch.device(args.device)
    rows = checks(device)
    print(f"peer wrappers against float64 references (tiny models, {common.device_name(device)})")
    print(f"  {'check':<58} {'rel err':>9}")
    ok, notes = True, []
    for label, err, known in rows:
        mark = ""
        if known:
            if known not in notes:
                notes.append(known)
            mark = f"  known ({notes.index(known) + 1})"
        print(f"  {label:<58} {err:>9.1e}{mark}")
        ok = ok and (err < TOLERANCE or bool(known))  # NaN (a peer that fails) is reported as known
    for i, note in enumerate(notes):
        print(f"  ({i + 1}) {note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
