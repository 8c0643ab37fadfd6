"""``DPSGD``: a whole DP-SGD step around the engine's clipped sum: per-sample clipping in one
forward and one backward, the sum over all ranks, Gaussian noise once, the division by the
expected batch size, the optimiser's step and the accountant's record."""

import math
import secrets
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from indivgrad_cuda import randomness
from indivgrad_cuda.capture.losses import losses_tallied, per_sample_loss_sum
from indivgrad_cuda.engine import PerSampleGrads
from indivgrad_cuda.privacy import accounting, distributed
from indivgrad_cuda.privacy.sampling import check_sample_rate


class StepStats(NamedTuple):
    norms: torch.Tensor  # [n] per-sample gradient norms of this process's batch, before clipping
    loss: torch.Tensor  # the mean of the batch's per-sample losses (NaN for an empty batch)


class DPSGD:
    """DP-SGD around any torch optimiser, for any model ``PerSampleGrads`` supports.

    Each logical step: every physical batch given to :meth:`accumulate` (or to :meth:`step`)
    adds ``sum_n min(1, max_grad_norm / (||g_n|| + 1e-6)) g_n`` over its samples (one forward
    and one backward, no per-sample gradient in memory); :meth:`step` then sums those over
    the processes (one all-reduce), adds Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` once, divides by ``expected_batch_size``, sets each
    trainable ``p.grad`` to the result, calls ``optimizer.step()`` and records the step for
    the accountant (:meth:`epsilon`).

    Args:
        model: the ``nn.Module``, or a ``DistributedDataParallel`` wrapping it (its module is
            used and its process group is the default; DDP's own gradient all-reduce never
            runs, since the step never calls DDP's forward: evaluate through it under no_grad).
        optimizer: any ``torch.optim.Optimizer`` over exactly the model's trainable parameters.
        noise_multiplier: sigma, >= 0.
        max_grad_norm: the clipping norm C, > 0.
        expected_batch_size, sample_rate, dataset_size: two of them (the third follows from
            ``expected_batch_size = sample_rate * dataset_size``), or ``expected_batch_size``
            alone (then nothing is accounted). The sum is divided by the expected size of a
            logical batch over all processes (as Opacus's ``loss_reduction="mean"``); the
            accountant records ``sample_rate``. Given both, they are used as given (Opacus
            divides by ``int(dataset_size * sample_rate)``, for instance).
        seed: seeds the noise generator (on the model's device); None draws one from the OS.
            Across processes rank 0's seed is used on every rank, so every rank adds the same
            noise and the replicas stay bit-identical.
        process_group: the group to all-reduce over (default: the DDP model's, else the
            default group when torch.distributed is initialised with more than one process).
            Its backend must serve the model's device: gloo (or mpi) for CPU, NCCL for CUDA.
        engine_options: ``max_chunk``, ``capture``, ``norm_method``, ``cuda_graphs`` for
            :class:`indivgrad_cuda.PerSampleGrads`.

    Noise is drawn by ``torch.normal`` from a ``torch.Generator``, one draw per trainable
    parameter in ``named_parameters()`` order: reproducible, not cryptographically secure
    (as Opacus without ``secure_mode``). Dropout masks draw from torch's default generator.
    At the first step across processes every rank's parameters (a hash of their bytes) and
    settings are compared once, and a difference raises on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[float] = None,
        sample_rate: Optional[float] = None,
        dataset_size: Optional[int] = None,
        seed: Optional[int] = None,
        process_group=None,
        **engine_options,
    ):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = process_group if process_group is not None else model.process_group
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (_is_number(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}")
        if not (_is_number(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm: expected a finite number > 0, got {max_grad_norm!r}")
        if seed is not None and not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed: expected an int >= 0 or None, got {seed!r}")
        self.model, self.optimizer = model, optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.sample_rate = _batch_and_rate(expected_batch_size, sample_rate, dataset_size)
        self.engine = PerSampleGrads(model, **engine_options)
        self.group = distributed.resolve_group(process_group)
        self.device = self.engine._device()
        if self.group is not None:
            distributed.check_backend(dist.get_backend_config(self.group), self.device)
        self._check_optimizer()
        self._seed_given = seed is not None
        self.seed = seed if seed is not None else secrets.randbits(62)
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.steps = 0
        self.history: list = []  # [(noise_multiplier, sample_rate, steps)], for the accountant
        self._sum: Optional[dict[str, torch.Tensor]] = None  # this logical step's clipped sums so far
        self._ranks_agree = self.group is None  # checked once, at the first step across processes

    # ---------------------------------------------------------------- public API

    def accumulate(self, inputs, target, loss_fn: Callable, *, reduction: str = "mean") -> StepStats:
        """Adds one physical batch's clipped per-sample gradients to this logical step
        (inputs, target, loss_fn and reduction as :class:`indivgrad_cuda.PerSampleGrads`).
        Nothing is noised or applied until :meth:`step`."""
        with losses_tallied() as tally:
            norms = self.engine.clipped_grad_sum(inputs, target, loss_fn, self.max_grad_norm, reduction=reduction)
        params = self._trainable()
        if self._sum is None:
            self._sum = {name: p.grad for name, p in params.items()}  # this batch's sums become the accumulator
            for p in params.values():
                p.grad = None  # so the next batch gets its own
        else:
            if self._sum.keys() != params.keys():
                raise RuntimeError(
                    f"the trainable parameters changed within a logical step: {sorted(self._sum)} before, "
                    f"{sorted(params)} now"
                )
            for name, p in params.items():
                self._sum[name].add_(p.grad)
        total = per_sample_loss_sum(tally, reduction)
        n = norms.shape[0]
        loss = total / n if total is not None and n else norms.new_full((), math.nan)
        return StepStats(norms, loss)

    def step(self, inputs=None, target=None, loss_fn: Optional[Callable] = None, *, reduction: str = "mean"):
        """Ends the logical step: accumulates ``inputs`` first when given (then returns their
        :class:`StepStats`, else None), sums over the processes, adds the noise, divides by
        the expected batch size, sets ``p.grad`` and calls ``optimizer.step()``. A step with
        no samples (Poisson sampling can draw none) applies the noise alone; every process
        must call it the same number of times."""
        stats = None
        if inputs is not None:
            if loss_fn is None:
                raise TypeError("loss_fn: needed with inputs")
            stats = self.accumulate(inputs, target, loss_fn, reduction=reduction)
        grads = self._sum if self._sum is not None else {n: torch.zeros_like(p) for n, p in self._trainable().items()}
        self._sum = None
        if self.group is not None:
            if not self._ranks_agree:
                self._agree_with_other_ranks()
                self._ranks_agree = True
            distributed.all_reduce_sum(list(grads.values()), self.group)
        if self.noise_multiplier > 0:
            randomness.add_noise(list(grads.values()), self.noise_multiplier * self.max_grad_norm, self.noise_generator)
        params = dict(self.model.named_parameters())
        for name, g in grads.items():
            params[name].grad = g.div_(self.expected_batch_size)
        self.optimizer.step()
        self.steps += 1
        if self.sample_rate is not None:
            accounting.record_step(self.history, self.noise_multiplier, self.sample_rate)
        return stats

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """Epsilon of (epsilon, delta)-DP spent so far, by Opacus's ``"prv"``, ``"rdp"`` or
        ``"gdp"`` accountant (needs Opacus: ``pip install 'indivgrad_cuda[opacus]'``)."""
        if self.sample_rate is None:
            raise ValueError(
                "epsilon: needs the sample rate; give DPSGD sample_rate, or dataset_size beside expected_batch_size"
            )
        return accounting.epsilon(self.history, delta, accountant)

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume: steps, the accountant's history, the noise seed
        and generator state (the optimiser and model have their own)."""
        return {
            "steps": self.steps,
            "history": list(self.history),
            "seed": self.seed,
            "noise_generator": self.noise_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.history, self.seed = state["steps"], list(state["history"]), state["seed"]
        self._seed_given = True
        self.noise_generator.set_state(state["noise_generator"])

    # ---------------------------------------------------------------- internals

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def _check_optimizer(self):
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        trainable = self._trainable()
        missing = [name for name, p in trainable.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"optimizer: does not update the model's trainable parameters {missing}")
        extra = len(in_optimizer - {id(p) for p in trainable.values()})
        if extra:
            raise ValueError(
                f"optimizer: updates {extra} tensor(s) that are not trainable parameters of the model (their stale "
                f"gradients would be applied at every step)"
            )

    def _agree_with_other_ranks(self):
        settings = {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "seed": self.seed if self._seed_given else None,
        }
        seed0 = distributed.check_ranks_agree(self.group, self._trainable(), settings, self.seed)
        if seed0 != self.seed:
            self.seed = seed0
            self.noise_generator.manual_seed(seed0)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _batch_and_rate(expected_batch_size, sample_rate, dataset_size):
    """(expected batch size, sample rate or None) from two of the three (or the expected
    batch size alone: no accounting)."""
    if dataset_size is not None and not (isinstance(dataset_size, int) and dataset_size > 0):
        raise ValueError(f"dataset_size: expected a positive int, got {dataset_size!r}")
    if sample_rate is not None:
        check_sample_rate(sample_rate)
    if expected_batch_size is not None and not (_is_number(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size: expected a number > 0, got {expected_batch_size!r}")
    given = sum(v is not None for v in (expected_batch_size, sample_rate, dataset_size))
    if given == 3:
        raise ValueError(
            "expected_batch_size, sample_rate, dataset_size: give two of them (the third follows), not all three"
        )
    if expected_batch_size is None:
        if sample_rate is None or dataset_size is None:
            raise ValueError(
                "expected_batch_size: expected a number > 0, or sample_rate with dataset_size; got "
                + (
                    "dataset_size alone"
                    if dataset_size is not None
                    else "sample_rate alone"
                    if sample_rate
                    else "neither"
                )
            )
        return float(sample_rate * dataset_size), float(sample_rate)
    if dataset_size is not None:
        if expected_batch_size > dataset_size:
            raise ValueError(f"expected_batch_size: {expected_batch_size} is more than dataset_size ({dataset_size})")
        sample_rate = expected_batch_size / dataset_size
    return float(expected_batch_size), None if sample_rate is None else float(sample_rate)
