"""``DPSGD``: a whole DP-SGD step around the engine's clipped sum: per-sample clipping in one
forward and one backward (flat, per group, automatic), the sum over all ranks, Gaussian noise
once, the division by the expected batch size, the optimiser's step, the adaptive
threshold's update and the accountant's record."""

import math
import secrets
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from indivgrad_cuda import randomness
from indivgrad_cuda.capture.losses import losses_tallied, per_sample_loss_sum
from indivgrad_cuda.engine import PerSampleGrads
from indivgrad_cuda.privacy import accounting, distributed, sharding
from indivgrad_cuda.privacy.adaptive import AdaptiveClipping
from indivgrad_cuda.privacy.sampling import check_sample_rate
from indivgrad_cuda.reducers import clipping
from indivgrad_cuda.reducers.clipping import DEFAULT_STABILITY, check_clip_fn


class StepStats(NamedTuple):
    norms: torch.Tensor  # this process's per-sample gradient norms before clipping: [n], or [n, G] by clip group
    loss: torch.Tensor  # the mean of the batch's per-sample losses (NaN for an empty batch)


class DPSGD:
    """DP-SGD around any torch optimiser, for any model ``PerSampleGrads`` supports.

    Each logical step: every physical batch given to :meth:`accumulate` (or to :meth:`step`)
    adds ``sum_n c_n g_n`` over its samples, ``g_n`` clipped as ``clip_fn`` and
    ``clip_groups`` say (one forward and one backward, no per-sample gradient in memory);
    :meth:`step` then sums those over the processes (one all-reduce; a model sharded with
    FSDP2 reduce-scatters during each backward instead), adds Gaussian noise of
    std ``noise_multiplier * max_grad_norm`` once, divides by ``expected_batch_size``, sets
    each trainable ``p.grad`` to the result, calls ``optimizer.step()``, updates an adaptive
    threshold and records the step for the accountant (:meth:`epsilon`).

    Args:
        model: the ``nn.Module``, or a ``DistributedDataParallel`` wrapping it (its module is
            used and its process group is the default; DDP's own gradient all-reduce never
            runs, since the step never calls DDP's forward: evaluate through it under no_grad),
            or a model sharded with FSDP2's ``fully_shard`` (every trainable parameter: see
            :mod:`indivgrad_cuda.privacy.sharding`; not DDP-wrapped, ``max_chunk`` None, the
            device mesh's group).
        optimizer: any ``torch.optim.Optimizer`` over exactly the model's trainable parameters.
        noise_multiplier: sigma, >= 0 (with adaptive clipping: of the gradient and the count
            together, see :class:`AdaptiveClipping`).
        max_grad_norm: the clipping norm C, > 0 (with adaptive clipping: its first value).
        expected_batch_size, sample_rate, dataset_size: two of them (the third follows from
            ``expected_batch_size = sample_rate * dataset_size``), or ``expected_batch_size``
            alone (then nothing is accounted). The sum is divided by the expected size of a
            logical batch over all processes (as Opacus's ``loss_reduction="mean"``); the
            accountant records ``sample_rate``. Given both, they are used as given (Opacus
            divides by ``int(dataset_size * sample_rate)``, for instance).
        clip_fn: ``"abadi"`` (``min(1, C_g / (||g|| + 1e-6))``, Opacus's) or
            ``"automatic"`` (``C_g / (||g|| + stability)``, Bu et al.'s AUTO-S, fastDP's
            default: every gradient normalised, C only scales the step).
        stability: gamma of ``"automatic"``, > 0 (default 0.01).
        clip_groups: None (the whole gradient clipped as one, Opacus's ``"flat"``),
            ``"layer"`` (each module's parameters apart: private-transformers' ``per_layer``,
            fastDP's ``layer-wise``), ``"param"`` (each parameter: fastDP's
            ``param-wise``), or a list of lists of parameter names (every trainable
            parameter once: fastDP's ``group-wise``). Each of the G groups is clipped to
            ``C_g = max_grad_norm / sqrt(G)``, so the whole clipped gradient's norm stays at
            most ``max_grad_norm`` and the noise keeps its meaning. :attr:`groups` lists them.
        adaptive_clipping: an :class:`AdaptiveClipping` (Andrew et al. 2021, Opacus's
            AdaClip): ``max_grad_norm`` follows a target quantile of the norms, the count's
            noise accounted for. Not with ``"automatic"``, which clips every sample alike.
        seed: seeds the noise (see below); None draws one from the OS. Across processes
            rank 0's seed is used on every rank, so every rank adds the same noise and the
            replicas stay bit-identical.
        process_group: the group to all-reduce over (default: the DDP model's, else the
            default group when torch.distributed is initialised with more than one process).
            Its backend must serve the model's device: gloo (or mpi) for CPU, NCCL for CUDA.
        engine_options: ``max_chunk``, ``capture``, ``norm_method``, ``cuda_graphs`` for
            :class:`indivgrad_cuda.PerSampleGrads` (``cuda_graphs`` defaults to False with
            adaptive clipping: a graph is keyed by the threshold, which changes every step).

    Noise: parameter k's noise at step t (k in ``named_parameters()`` order of the
    trainable ones) is drawn in blocks of whole rows, each block by ``normal_`` from a
    ``torch.Generator`` on the model's device seeded from (seed, t, k, block)
    (:func:`indivgrad_cuda.randomness.noise_rows`): reproducible from the seed and the step
    alone (a checkpoint needs no generator state), and the same whether a parameter is drawn
    whole or shard by shard. Not cryptographically secure (as Opacus without
    ``secure_mode``). Dropout masks draw from torch's default generator. At the first step
    across processes every rank's parameters (a hash of their bytes) and settings are
    compared once, and a difference raises on every rank.

    NaN: a sample whose loss or gradient is not finite gets NaN norms in :class:`StepStats`
    and makes the step's sums (so ``p.grad`` and the parameters after :meth:`step`) NaN, as
    in Opacus; one whose gradient is finite but whose norm overflows (inf) is clipped to
    zero. Check ``torch.isfinite(stats.norms)`` after :meth:`accumulate` to catch both.
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
        clip_fn: str = "abadi",
        stability: float = DEFAULT_STABILITY,
        clip_groups=None,
        adaptive_clipping: Optional[AdaptiveClipping] = None,
        seed: Optional[int] = None,
        process_group=None,
        **engine_options,
    ):
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if ddp:
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
        check_clip_fn(clip_fn, stability)
        if adaptive_clipping is not None and not isinstance(adaptive_clipping, AdaptiveClipping):
            raise TypeError(
                f"adaptive_clipping: expected an indivgrad_cuda.privacy.AdaptiveClipping or None, "
                f"got {type(adaptive_clipping).__name__}"
            )
        if adaptive_clipping is not None and clip_fn == "automatic":
            raise ValueError(
                "adaptive_clipping: clip_fn='automatic' rescales every sample's gradient, so no sample is left "
                "unclipped and there is no threshold to adapt (its max_grad_norm only scales the step)"
            )
        self.model, self.optimizer = model, optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.sample_rate = _batch_and_rate(expected_batch_size, sample_rate, dataset_size)
        self.clip_fn, self.stability, self.clip_groups = clip_fn, float(stability), clip_groups
        self.adaptive_clipping = adaptive_clipping
        if adaptive_clipping is not None:  # 2 sigma_b > noise_multiplier, checked now
            adaptive_clipping.gradient_noise_multiplier(self.noise_multiplier, self.expected_batch_size)
            adaptive_clipping.check_start(self.max_grad_norm)
        # a CUDA graph is keyed by the threshold, which adaptive clipping changes at every step
        engine_options.setdefault("cuda_graphs", adaptive_clipping is None)
        self.engine = PerSampleGrads(model, **engine_options)
        self.engine.clip_groups(clip_groups)  # checked now, not at the first step
        self.shards = None  # a sharded model's (FSDP2): see privacy/sharding.py
        if sharding.is_sharded_model(self._trainable()):
            self.shards = self._sharded(ddp, process_group)
            process_group = self.shards.group
        self.group = distributed.resolve_group(process_group)
        self.device = self.engine._device()
        if self.group is not None:
            distributed.check_backend(dist.get_backend_config(self.group), self.device)
        self._check_optimizer()
        self._seed_given = seed is not None
        self.seed = seed if seed is not None else secrets.randbits(62)
        self._noise_generator = torch.Generator(device=self.device)  # seeded per block of noise
        self.steps = 0
        self.history: list = []  # [(noise_multiplier, sample_rate, steps)], for the accountant
        self._sum: Optional[dict[str, torch.Tensor]] = None  # this logical step's clipped sums so far
        self._tally: Optional[torch.Tensor] = None  # [unclipped samples, samples] of this logical step
        self._ranks_agree = self.group is None  # checked once, at the first step across processes

    # ---------------------------------------------------------------- public API

    @property
    def groups(self) -> list[list[str]]:
        """The clip groups as lists of parameter names (one group when ``clip_groups`` is None):
        the columns of :class:`StepStats`' norms when ``clip_groups`` is given."""
        return self.engine.clip_groups(self.clip_groups)

    @property
    def gradient_noise_multiplier(self) -> float:
        """The gradient's noise is ``N(0, (gradient_noise_multiplier * max_grad_norm)²)``: the
        noise multiplier itself, or with adaptive clipping the larger one that leaves the
        count its share (:meth:`AdaptiveClipping.gradient_noise_multiplier`)."""
        if self.adaptive_clipping is None:
            return self.noise_multiplier
        return self.adaptive_clipping.gradient_noise_multiplier(self.noise_multiplier, self.expected_batch_size)

    def accumulate(self, inputs, target, loss_fn: Callable, *, reduction: str = "mean") -> StepStats:
        """Adds one physical batch's clipped per-sample gradients to this logical step
        (inputs, target, loss_fn and reduction as :class:`indivgrad_cuda.PerSampleGrads`).
        Nothing is noised or applied until :meth:`step`."""
        self._ensure_ranks_agree()  # before the first collective (a sharded model's run in its forward)
        options = dict(
            reduction=reduction, clip_fn=self.clip_fn, stability=self.stability, clip_groups=self.clip_groups
        )
        params = self._trainable()
        self._check_trainable(params)
        with losses_tallied() as tally:
            if self.shards is not None:
                sums = {}
                self.shards.begin()
                norms = self.engine._clipped_sum_into(
                    inputs,
                    target,
                    loss_fn,
                    self.max_grad_norm,
                    lambda g: self.shards.collect(g, sums),
                    **options,
                )
                self.shards.finish()
            else:
                norms = self.engine.clipped_grad_sum(inputs, target, loss_fn, self.max_grad_norm, **options)
        if self.shards is None:
            sums = {name: p.grad for name, p in params.items()}
            for p in params.values():
                p.grad = None  # the next batch gets its own (these become the step's accumulator)
        if self._sum is None:
            self._sum = {name: sums[name] for name in params}
        else:
            for name, g in self._sum.items():
                g.add_(sums[name])
        if self.adaptive_clipping is not None:
            self._count_unclipped(norms)
        total = per_sample_loss_sum(tally, reduction)
        n = norms.shape[0]
        loss = total / n if total is not None and n else norms.new_full((), math.nan)
        return StepStats(norms, loss)

    def step(self, inputs=None, target=None, loss_fn: Optional[Callable] = None, *, reduction: str = "mean"):
        """Ends the logical step: accumulates ``inputs`` first when given (then returns their
        :class:`StepStats`, else None), sums over the processes, adds the noise, divides by
        the expected batch size, sets ``p.grad``, calls ``optimizer.step()`` and updates an
        adaptive threshold. A step with no samples (Poisson sampling can draw none) applies
        the noise alone; every process must call it the same number of times. On a model
        sharded with FSDP2 every process runs every batch's forward and backward (their
        collectives pair up): a process with no samples passes its empty batch (0-row tensors,
        as ``poisson_loader`` gives), not ``step()`` alone, unless every process does."""
        stats = None
        if inputs is not None:
            if loss_fn is None:
                raise TypeError("loss_fn: needed with inputs")
            stats = self.accumulate(inputs, target, loss_fn, reduction=reduction)
        self._ensure_ranks_agree()
        params = self._trainable()
        self._check_trainable(params)
        grads = self._sum
        if grads is None:
            grads = {n: self._zeros(n, p) for n, p in params.items()}
        tally = self._tally
        if self.adaptive_clipping is not None and tally is None:
            tally = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._sum = self._tally = None  # taken: a failure below loses this step's sums, as it must
        if self.group is not None:  # a sharded model's sums are summed already: by the reduce-scatters
            replicated = list(grads.values()) if self.shards is None else []
            distributed.all_reduce_sum(replicated + ([tally] if tally is not None else []), self.group)
        std = self.gradient_noise_multiplier * self.max_grad_norm
        if std > 0:
            for k, (name, g) in enumerate(grads.items()):
                p = params[name]
                rows = self.shards.rows[name] if self.shards is not None else (0, p.shape[0] if p.dim() else 1)
                g.add_(self._noise(p.shape, rows, std, k, g).view_as(g))
        for name, g in grads.items():
            g.div_(self.expected_batch_size)
            if self.shards is not None:
                self.shards.set_grad(params[name], g)
            else:
                params[name].grad = g
        self.optimizer.step()
        if self.adaptive_clipping is not None:
            self.max_grad_norm = self._adapted(tally)
        self.steps += 1
        if self.sample_rate is not None:
            accounting.record_step(self.history, self.noise_multiplier, self.sample_rate)
        return stats

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """Epsilon of (epsilon, delta)-DP spent so far, by Opacus's ``"prv"``, ``"rdp"`` or
        ``"gdp"`` accountant (needs Opacus: ``pip install 'indivgrad_cuda[opacus]'``). With
        adaptive clipping the history holds ``noise_multiplier``, which the gradient's and
        the count's noise together amount to (:class:`AdaptiveClipping`)."""
        if self.sample_rate is None:
            raise ValueError(
                "epsilon: needs the sample rate; give DPSGD sample_rate, or dataset_size beside expected_batch_size"
            )
        return accounting.epsilon(self.history, delta, accountant)

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume: steps, the accountant's history, the noise seed
        and the (adaptive) threshold (the optimiser and model have their own). Taken between
        logical steps: not after :meth:`accumulate` before its :meth:`step`, whose clipped
        sums so far it would leave out."""
        if self._sum is not None:
            raise RuntimeError(
                "state_dict: a logical step is under way (accumulate() was called since the last step()); its "
                "clipped sums so far are not part of a checkpoint: call step() first, then state_dict()"
            )
        return {
            "steps": self.steps,
            "history": list(self.history),
            "seed": self.seed,
            "max_grad_norm": self.max_grad_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        threshold = float(state.get("max_grad_norm", self.max_grad_norm))
        if self.adaptive_clipping is not None:  # else the constructor's threshold stands
            self.adaptive_clipping.check_start(threshold, "state['max_grad_norm']")
            self.max_grad_norm = threshold
        self.steps, self.history, self.seed = state["steps"], list(state["history"]), state["seed"]
        self._seed_given = True

    # ---------------------------------------------------------------- internals

    def _sharded(self, ddp: bool, process_group) -> "sharding.Shards":
        """The shards of a model sharded with fully_shard, after the checks that need it."""
        if ddp:
            raise ValueError(
                "model: a DistributedDataParallel wrapping a model sharded with fully_shard (FSDP2); FSDP2 does the "
                "data parallelism itself: pass the fully_shard model, unwrapped"
            )
        if process_group is not None:
            raise ValueError(
                "process_group: a model sharded with fully_shard (FSDP2) reduces over its device mesh's group; "
                "leave process_group None"
            )
        if self.engine.max_chunk is not None:
            raise ValueError(
                f"max_chunk: a model sharded with fully_shard (FSDP2) runs each batch in one forward and backward "
                f"(its collectives pair every process's), so max_chunk must be None, got {self.engine.max_chunk}"
            )
        return sharding.Shards(self.model, self._trainable())

    def _check_trainable(self, params: dict) -> None:
        """The trainable parameters may change between logical steps, not within one (a sharded
        model's shards are then worked out again)."""
        if self._sum is not None and self._sum.keys() != params.keys():
            raise RuntimeError(
                f"the trainable parameters changed within a logical step: {sorted(self._sum)} before, "
                f"{sorted(params)} now"
            )
        if self.shards is not None and self.shards.rows.keys() != params.keys():
            self.shards = sharding.Shards(self.model, params)

    def _zeros(self, name: str, p) -> torch.Tensor:
        return self.shards.zeros(p, name) if self.shards is not None else torch.zeros_like(p)

    def _ensure_ranks_agree(self) -> None:
        if not self._ranks_agree:
            self._agree_with_other_ranks()
            self._ranks_agree = True

    def _noise(self, shape, rows, std, index, like) -> torch.Tensor:
        return randomness.noise_rows(
            shape, rows, std, self.seed, self.steps, index, like.dtype, like.device, self._noise_generator
        )

    def _count_unclipped(self, norms: torch.Tensor) -> None:
        """Adds the batch's samples, and those no part of which was clipped, to the step's tally."""
        groups = norms.shape[1] if norms.dim() == 2 else 1  # [n, G] with clip groups
        kept = clipping.unclipped(norms, clipping.group_threshold(self.max_grad_norm, groups))
        counts = torch.stack([kept.sum(), torch.tensor(norms.shape[0], device=norms.device)]).double()
        self._tally = counts if self._tally is None else self._tally.add_(counts)

    def _adapted(self, tally: torch.Tensor) -> float:
        """The next threshold from the step's tally (summed over the processes): the centred
        count noised with std sigma_b (0 when noise_multiplier is 0), drawn like the noise."""
        adaptive = self.adaptive_clipping
        unclipped, samples = tally.tolist()
        noise = 0.0
        if self.noise_multiplier > 0:
            g = torch.Generator().manual_seed(randomness.noise_seed(self.seed, self.steps, "count"))
            std = adaptive.count_std(self.expected_batch_size)
            noise = torch.empty((), dtype=torch.float64).normal_(0.0, std, generator=g).item()
        return adaptive.updated(self.max_grad_norm, unclipped - samples / 2 + noise, self.expected_batch_size)

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
            "clip_fn": self.clip_fn,
            "stability": self.stability,
            "groups": self.groups,
            "adaptive_clipping": self.adaptive_clipping,
            "steps": self.steps,
            "seed": self.seed if self._seed_given else None,
        }
        replicas = self._trainable() if self.shards is None else {}  # shards differ by design
        seed0 = distributed.check_ranks_agree(self.group, replicas, settings, self.seed)
        if seed0 != self.seed:
            self.seed = seed0


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
