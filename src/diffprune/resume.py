"""Checkpoints of a training run and continuing from one (train.Trainer's state).

A checkpoint holds the diff's trainable tensors and the dense ones, the optimizer's state,
every rank's RNG states and the gate-noise generator's, the best epoch so far, the position
in the phases and the settings, so that ``resume=True`` ends with the same diff as an
uninterrupted run. Written by rank 0 only, atomically (checkpoint.save_checkpoint).
"""
from __future__ import annotations

import logging

import torch

from . import checkpoint as ckpt
from . import distributed
from .errors import ConfigError
from .inject import get_state, is_prepared

log = logging.getLogger(__name__)


class Resumable:
    """Checkpoint and restore for train.Trainer, which provides what these methods read:
    model, device, dist, cfg, out, optimizer, controller, best, pos, results, elapsed,
    phases, and _make_optimizer, _make_controller, steps_per_epoch, _warm_steps.
    peers.PeftTrainer overrides _trainables and _load_trainables."""

    def _trainables(self) -> dict[str, torch.Tensor]:
        state = get_state(self.model)
        out = {f"model.{k}": v.detach().clone() for k, v in state.state_dict().items()}
        out.update({f"dense.{n}": self.model.get_parameter(n).detach().clone()
                    for n in state.dense_names})
        return out

    def _load_trainables(self, tensors: dict[str, torch.Tensor]) -> None:
        state = get_state(self.model)
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if any(k.startswith("values.") for k in model_sd) and state.stage != "fixed":
            n = len(state.targets)
            state.set_stage_("fixed", [model_sd[f"indices_{i}"] for i in range(n)],
                             [model_sd[f"values.{i}"] for i in range(n)])
        state.load_state_dict(model_sd)
        with torch.no_grad():
            for n in state.dense_names:
                self.model.get_parameter(n).copy_(tensors[f"dense.{n}"])
        self.model.to(self.device)

    def _checkpoint(self) -> None:
        tensors = self._trainables()
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        tensors.update(opt_tensors)
        tensors.update(self._rng_tensors())
        if self.best is not None:
            tensors.update({f"best.{k}": v for k, v in self.best["tensors"].items()})
        meta = {"config": self.cfg.fingerprint(), "pos": self.pos, "results": self.results,
                "optimizer": opt_meta, "elapsed": self.elapsed,
                "controller": self.controller.state_dict() if self.controller else None,
                "best": None if self.best is None else {k: v for k, v in self.best.items()
                                                        if k != "tensors"},
                "world_size": self.dist.world}
        if self.dist.main:
            ckpt.save_checkpoint(self.out / "checkpoint", tensors, meta)
        distributed.barrier(self.dist)

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states (dropout differs per rank) and the gate-noise generator."""
        local = ckpt.rng_state()
        gen = get_state(self.model).noise_generator() if is_prepared(self.model) else None
        if gen is not None:
            local["rng.gates"] = gen.get_state()
        return {f"rank{r}.{k}": v for r, states in enumerate(distributed.gather(local, self.dist))
                for k, v in states.items()}

    def _set_rng(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = f"rank{self.dist.rank}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        ckpt.set_rng_state(mine)
        if "rng.gates" in mine:
            get_state(self.model).noise_generator().set_state(mine["rng.gates"])

    def _restore(self) -> None:
        tensors, meta = ckpt.load_checkpoint(self.out / "checkpoint")
        if meta.get("world_size", 1) != self.dist.world:
            raise ConfigError(f"cannot resume {self.out}: it was trained by "
                              f"{meta.get('world_size', 1)} "
                              f"processes, this launch has {self.dist.world} (dropout RNG and "
                              "batch split are per rank)")
        if meta["config"] != self.cfg.fingerprint():
            changed = sorted(k for k, v in self.cfg.fingerprint().items()
                             if meta["config"].get(k) != v)
            raise ConfigError(f"cannot resume {self.out}: the run was started with different "
                              f"settings ({', '.join(changed)})")
        self._load_trainables(tensors)
        self.pos, self.results, self.elapsed = meta["pos"], meta["results"], meta["elapsed"]
        phase = self.phases[self.pos["phase"]]
        self._make_optimizer(phase)
        ckpt.optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.controller = self._make_controller(phase)
        if phase.stage == "l0":  # the warm-up's state follows from the position
            step = self.pos["epoch"] * self.steps_per_epoch() + self.pos["batch"]
            get_state(self.model).hold_open = step < self._warm_steps(phase)
        if meta["controller"] is not None:
            self.controller.load_state_dict(meta["controller"])
        if meta["best"] is not None:
            self.best = {**meta["best"], "tensors": {k[5:]: v for k, v in tensors.items()
                                                     if k.startswith("best.")}}
        self._set_rng(tensors)
        log.info("resumed %s at step %d", self.out, self.pos["global_step"])
