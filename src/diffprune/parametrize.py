"""theta = theta0 + delta for every selected tensor of a model, in three stages.

Diff pruning (Guo, Rush & Kim, ACL 2021) keeps the pretrained theta0 frozen and learns a diff:

- ``"l0"``    : delta = z * w, z a hard-concrete gate per entry (Sec. 3.1), times one group gate
                per tensor when structured (Sec. 3.2). One stochastic mask per forward in
                training mode, deterministic gates in eval mode.
- ``"dense"`` : delta = w (plain finetuning expressed as a diff; the magnitude baseline, Sec. 5).
- ``"fixed"`` : delta = scatter(indices, values), the fixed-mask stage after projection (Sec. 3.3).
                Only the nnz values are parameters, so the optimizer keeps state only for them.

The :class:`DiffState` module is attached to the model as ``model.diffprune``. A forward pre-hook
on the model's root computes every theta once per forward and sets it as a plain tensor
attribute on each module that owns the parameter (tied parameters share one theta, sampled once).
In a training forward with counter.py's gate, large untied embedding tables are the exception:
their own pre-hook gates only the rows their input reads (rows.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import counter, flat, gates, rows
from .config import DiffPruneConfig
from .errors import DiffPruneError
from .fused import GatedDelta

STAGES = ("l0", "dense", "fixed")
STATE_ATTR = "diffprune"


@dataclass
class Target:
    """One base parameter that carries a diff (tied parameters appear once)."""

    name: str
    shape: tuple[int, ...]
    owners: list[tuple[nn.Module, str]] = field(repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    # Diff weights of half-precision bases are kept in float32 (tiny updates would round away).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class DiffState(nn.Module):
    """Frozen theta0 (non-persistent buffers), the trainable diff, and the current stage."""

    def __init__(self, config: DiffPruneConfig, targets: list[Target],
                 theta0: list[torch.Tensor], dense_names: list[str], stage: str = "l0"):
        super().__init__()
        self.config = config
        self.targets = targets
        self.dense_names = dense_names
        self.stage = ""
        self.noise_seed: int | None = None  # None: gate noise from torch's global RNG
        self.hold_open = False  # L0 stage with every gate held open: delta = w (dense warm-up)
        self.gate_step = None  # optim.GateStep: log_alpha steps inside backward (fused.py)
        self._noise: torch.Generator | None = None
        self.row_targets: set[int] = set()  # embeddings gated by the rows they read (rows.py)
        self.rows_pending: dict[int, rows.Pending] = {}
        for i, t0 in enumerate(theta0):
            self.register_buffer(f"theta0_{i}", t0.detach(), persistent=False)
        self.set_stage_(stage)

    # --- stage management -------------------------------------------------------------
    def theta0(self, i: int) -> torch.Tensor:
        return getattr(self, f"theta0_{i}")

    def _drop_trainables(self) -> None:
        for name in ("w", "log_alpha", "group_log_alpha", "values", "logit_shift"):
            if hasattr(self, name):
                delattr(self, name)
        for i in range(len(self.targets)):
            if f"indices_{i}" in self._buffers:
                delattr(self, f"indices_{i}")

    def _zeros_like_theta0(self) -> nn.ParameterList:
        return nn.ParameterList(
            nn.Parameter(torch.zeros_like(self.theta0(i), dtype=_master_dtype(self.theta0(i).dtype)))
            for i in range(len(self.targets)))

    def set_stage_(self, stage: str, indices: list[torch.Tensor] | None = None,
                   values: list[torch.Tensor] | None = None) -> None:
        """(Re)initialise the trainable diff for ``stage``; the fixed stage needs indices/values."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self._drop_trainables()
        self.stage = stage
        if stage in ("l0", "dense"):
            self.w = self._zeros_like_theta0()  # w = 0: the model starts exactly at theta0
        if stage == "l0":
            a = self.config.init_log_alpha
            self.log_alpha = nn.ParameterList(
                nn.Parameter(torch.full(t.shape, a, device=self.theta0(i).device))
                for i, t in enumerate(self.targets))
            if self.config.structured:
                self.group_log_alpha = nn.Parameter(
                    torch.full((len(self.targets),), a, device=self.theta0(0).device))
            # A logit offset shared by every gate, set by the density controller (penalty.py);
            # 0 reproduces the paper's gates exactly.
            self.register_buffer("logit_shift", torch.zeros((), device=self.theta0(0).device))
        if stage == "fixed":
            if indices is None or values is None:
                raise ValueError("the fixed stage needs indices and values per target")
            for i, idx in enumerate(indices):
                self.register_buffer(f"indices_{i}", idx.to(self.theta0(i).device, torch.int64))
            self.values = nn.ParameterList(
                nn.Parameter(v.detach().to(self.theta0(i).device,
                                           _master_dtype(self.theta0(i).dtype)).clone())
                for i, v in enumerate(values))

    def indices(self, i: int) -> torch.Tensor:
        return getattr(self, f"indices_{i}")  # (nnz_i,) int64, sorted flat positions

    # --- gates --------------------------------------------------------------------------
    def seed_noise(self, seed: int) -> None:
        """Draw the gate noise from a generator of its own, seeded with ``seed``.

        Under data parallelism every rank seeds it alike, so all ranks sample the same mask
        each step (the parameters are shared), while dropout keeps each rank's own RNG. On
        CPU the stream is numpy's PCG64 (gates.CpuNoise, faster than torch's CPU generator;
        counter.py's kernels take one seed per tensor, or per group of small tensors, and
        step), elsewhere a torch.Generator of the device."""
        self.noise_seed, self._noise = seed, None

    def noise_generator(self) -> "torch.Generator | gates.CpuNoise | None":
        device = self.theta0(0).device
        if self.noise_seed is not None and (self._noise is None or
                                            self._noise.device != device):
            cpu = device.type == "cpu" and not flat.ON_CPU
            self._noise = (gates.CpuNoise(self.noise_seed) if cpu else
                           torch.Generator(device).manual_seed(self.noise_seed))
        return self._noise

    def gate_args(self) -> dict:
        c = self.config
        return {"left": c.stretch_left, "right": c.stretch_right}

    def logits(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Effective log_alpha per target, log_alpha + shift, and of the group gates.

        The controller's shift moves the entry gates only: shifted too, a group gate (which
        sums the evidence of a whole tensor) is the cheapest way to the target and shuts
        whole tensors before any entry is selected (bench/README.md). Group gates learn from
        the task loss alone."""
        b = self.logit_shift
        group = self.group_log_alpha if self.config.structured else None
        return [a + b for a in self.log_alpha], group

    @torch.no_grad()
    def init_gates_from_w_(self, scale: float, sample: int = 1 << 20) -> None:
        """log_alpha = init_log_alpha + scale * (standardised log|w| - its 1st percentile).

        After a dense warm-up, the gates start ordered by how far each entry moved, 99% of
        the entries that moved at least as open as init_log_alpha (so the density schedule
        starts near 1); entries that never moved (w = 0: embedding rows of words absent from
        the data) start 3 standard deviations below those. The L0 phase then reorders the
        gates by the task gradient. The statistics of log|w| over the nonzero entries come
        from an evenly strided sample of about ``sample`` entries over all targets."""
        flat = [w.detach().reshape(-1) for w in self.w]
        n = sum(x.numel() for x in flat)
        stride = max(1, n // sample)
        pooled = torch.cat([x[::stride] for x in flat]).abs().float()
        pooled = pooled[pooled > 0].log()
        if pooled.numel() < 2:
            raise DiffPruneError("init_gates_from_w_: w is (almost) all zero; train it first")
        mean, std = pooled.mean(), pooled.std().clamp_min(1e-12)
        low = torch.quantile((pooled - mean) / std, 0.01)
        floor = float(low) - 3.0
        for a, x in zip(self.log_alpha, flat):
            score = x.abs().log_().sub_(mean).div_(std).clamp_min_(floor)  # log 0 -> floor
            a.copy_(score.sub_(low).mul_(scale).add_(self.config.init_log_alpha).view(a.shape))
        self.logit_shift.zero_()

    def gates(self, stochastic: bool) -> list[torch.Tensor]:
        """z per target (L0 stage), including the group gate when structured."""
        c = self.config
        elem, group = self.logits()
        if stochastic:
            gen = self.noise_generator()

            def gate(a):
                return gates.sample_gate(a, temperature=c.temperature, generator=gen,
                                         **self.gate_args())
        else:
            def gate(a):
                return gates.deterministic_gate(a, **self.gate_args())
        zs = [gate(a) for a in elem]
        if group is None:
            return zs
        zg = gate(group)
        return [z * zg[i] for i, z in enumerate(zs)]

    # --- the diff -----------------------------------------------------------------------
    def deltas(self, stochastic: bool = False) -> list[torch.Tensor]:
        """delta per target, same shape as theta0 (differentiable)."""
        if self.stage == "dense" or (self.stage == "l0" and self.hold_open):
            return list(self.w)
        if self.stage == "l0":
            return [z * w for z, w in zip(self.gates(stochastic), self.w)]
        out = []
        for i, v in enumerate(self.values):
            t0 = self.theta0(i)
            flat = torch.zeros(t0.numel(), dtype=v.dtype, device=v.device)
            out.append(flat.index_add(0, self.indices(i), v).view(t0.shape))
        return out

    def thetas(self, stochastic: bool = False, by_rows: bool = False) -> list[torch.Tensor]:
        """theta = theta0 + delta per target, in the base dtype. ``by_rows``: the sampled L0
        gate of the row_targets is left pending for their modules' hooks (rows.py), which
        gate only the rows they read; theta0 stands in for them until then."""
        if self.stage == "fixed":
            # Scatter the nnz values straight into a copy of theta0: exactly what
            # SparseDiff.apply_ and merging do, so all three agree bit for bit.
            theta0s = [self.theta0(i) for i in range(len(self.targets))]
            if flat.usable(theta0s, None):  # accelerators: one scatter for all (flat.py)
                indices = [self.indices(i) for i in range(len(self.targets))]
                key = tuple((id(x), x._version) for x in indices)  # a load copies into them
                if getattr(self, "_flat_indices", (None,))[0] != key:
                    self._flat_indices = key, flat.offset_indices(indices, theta0s)
                return flat.fixed_thetas(theta0s, list(self.values), self._flat_indices[1])
            out = []
            for i, v in enumerate(self.values):
                t0 = self.theta0(i)
                scattered = t0.reshape(-1).to(v.dtype).index_add(0, self.indices(i), v)
                out.append(scattered.view(t0.shape).to(t0.dtype))
            return out
        if self.stage == "l0" and not self.hold_open:
            return self._l0_thetas(stochastic, by_rows)
        return [(self.theta0(i) + d).to(self.theta0(i).dtype)
                for i, d in enumerate(self.deltas(stochastic))]

    def _l0_thetas(self, stochastic: bool, by_rows: bool = False) -> list[torch.Tensor]:
        """The L0 stage through the fused gate (fused.py): same values as deltas(), less
        memory and fewer passes."""
        c = self.config
        group = self.group_log_alpha if c.structured else None  # unshifted, as in logits()
        gen = self.noise_generator() if stochastic else None
        if group is None:
            zg = torch.ones(len(self.targets), device=self.theta0(0).device)
        elif stochastic:
            zg = gates.sample_gate(group, temperature=c.temperature, generator=gen,
                                   **self.gate_args())
        else:
            zg = gates.deterministic_gate(group, **self.gate_args())
        expected = c.gate_grad == "expected"
        theta0s = [self.theta0(i) for i in range(len(self.targets))]
        if flat.usable(theta0s, gen):  # accelerators: every target in one pass (flat.py)
            return flat.gated_thetas(theta0s, list(self.w), list(self.log_alpha),
                                     self.logit_shift, zg, c.stretch_left, c.stretch_right,
                                     c.temperature, stochastic, expected, gen, self.gate_step)
        thetas = [None] * len(self.targets)
        small = self._small_group(gen)
        if small:  # many small tensors in one pass (counter.GatedGroup)
            grouped = counter.GatedGroup.apply(
                (*self._counter_consts(gen, expected), self.gate_step),
                *(self.theta0(i) for i in small), *(self.w[i] for i in small),
                *(self.log_alpha[i] for i in small), zg[small])
            for i, theta in zip(small, grouped):
                thetas[i] = theta
        # the shift goes in as a scalar: a + shift (N entries) is never materialised
        for i, (w, a) in enumerate(zip(self.w, self.log_alpha)):
            if thetas[i] is None and self._by_rows(i, by_rows, gen):
                # drawn in GatedDelta's turn: the seed it would have drawn for this tensor
                self.rows_pending[i] = rows.Pending(*self._counter_consts(gen, expected),
                                                    zg[i], self.gate_step)
                thetas[i] = self.theta0(i)
            elif thetas[i] is None:
                thetas[i] = GatedDelta.apply(
                    self.theta0(i), w, a, self.logit_shift, zg[i], c.stretch_left,
                    c.stretch_right, c.temperature if stochastic else 1.0, stochastic,
                    expected, gen, self.gate_step)
        return thetas

    def _counter_consts(self, generator, expected: bool) -> tuple:
        """(kernels, seed, shift) for counter.py's kernels; draws the next seed."""
        c = self.config
        return (counter.kernels(c.stretch_left, c.stretch_right, c.temperature, expected),
                counter.scalar(generator.seed32(), torch.int32),
                counter.scalar(self.logit_shift))

    def _by_rows(self, i: int, by_rows: bool, generator) -> bool:
        return (by_rows and i in self.row_targets and isinstance(generator, gates.CpuNoise)
                and counter.usable(self.theta0(i), self.w[i], self.log_alpha[i]))

    def _small_group(self, generator) -> list[int]:
        """Targets gated together by counter.GatedGroup: those under counter.SMALL entries,
        when the gate is sampled with counter.py's noise (two or more of them)."""
        if not isinstance(generator, gates.CpuNoise):
            return []
        small = [i for i, (w, a) in enumerate(zip(self.w, self.log_alpha))
                 if w.numel() < counter.SMALL and counter.usable(self.theta0(i), w, a)]
        return small if len(small) > 1 else []

    def _version(self) -> tuple:
        """Changes whenever a trainable tensor of the diff or the stage changes."""
        return (self.stage, self.hold_open, *(p._version for p in self.parameters()),
                *(id(p) for p in self.parameters()), self.logit_shift._version
                if hasattr(self, "logit_shift") else 0)

    def materialize(self, stochastic: bool, by_rows: bool = False) -> None:
        """Set theta on every owning module (called before each forward of the root).

        In eval mode theta is deterministic, so it is computed once and reused until a
        parameter changes (evaluation over many batches pays for it once). ``by_rows``: see
        thetas()."""
        if not stochastic and not torch.is_grad_enabled():
            key = self._version()
            if getattr(self, "_eval_key", None) == key:
                return
            self._eval_key = key
        else:
            self._eval_key = None
        # Let go of the previous step's thetas before computing the new ones: otherwise both
        # sets are alive at once, one model's worth of memory at the peak.
        for target in self.targets:
            for module, attr in target.owners:
                module.__dict__.pop(attr, None)
        self.rows_pending = {}
        for target, theta in zip(self.targets, self.thetas(stochastic, by_rows)):
            for module, attr in target.owners:
                # A plain attribute (the Parameter was removed from module._parameters).
                module.__dict__[attr] = theta

    def release(self) -> None:
        """After a training forward: point every owning module back at theta0, so that each
        theta lives only as long as autograd needs it (freed as soon as its consumer's backward
        has run; an embedding's right after the forward). The modules stay usable; their
        weights are the base's until the next forward."""
        self.rows_pending = {}
        for i, target in enumerate(self.targets):
            for module, attr in target.owners:
                module.__dict__[attr] = self.theta0(i)

    def numel(self) -> int:
        """Number of gated (diff-carrying) base parameters N."""
        return sum(t.numel for t in self.targets)

    def forward(self, *args, **kwargs):  # pragma: no cover - never called directly
        raise RuntimeError("DiffState is driven by its model's forward pre-hook")
