"""One training loop for every method: diff pruning, full finetuning, magnitude, BitFit, random.

Every method is a list of phases over a model prepared with diffprune (Guo, Rush & Kim 2021):
  diff      : L0 phase (gates + w)  -> projection to k nonzeros -> fixed-mask phase
  magnitude : dense phase (theta0+w) -> projection              -> fixed-mask phase  (Sec. 5)
  random    :                          random mask of k entries -> fixed-mask phase  (control)
  full      : dense phase (theta0+w: plain finetuning, written as a dense diff)
  bitfit    : dense phase on biases only (Ben Zaken et al. 2022)
The task head is always trained densely. Dev evaluation after every epoch; the best dev epoch
of the last phase is kept. Checkpoints (every ``save_every`` steps and at epoch ends) let an
interrupted run continue with ``resume=True`` and end with the same diff.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import DiffPruneConfig
from .data import TaskData, get_task, load_files, load_task
from .data.batches import collate, evaluate, subsample, tokenize
from .errors import DiffPruneError
from .fileio import atomic_write_bytes
from .hf import head_config, load_model
from .inject import get_state, prepare_
from .penalty import DensityController, expected_density, l0_penalty, param_groups
from .optim import DiffAdamW, GateStep
from .project import project_, random_mask_
from .recipe import GATE_GROUPS, PEFT_METHODS, Phase, TrainConfig, plan
from .resume import Resumable
from .sparse_diff import SparseDiff

log = logging.getLogger(__name__)


class TrainingInterrupted(DiffPruneError):
    """The run stopped early (signal or stop_after_steps) after writing a checkpoint."""


def load_data(cfg: TrainConfig) -> TaskData:
    if cfg.train_file:
        return load_files(cfg.train_file, cfg.dev_file, cfg.text_column, cfg.text_pair_column,
                          cfg.label_column, cfg.regression, name=cfg.task)
    return load_task(get_task(cfg.task), cfg.data_dir)


class Trainer(Resumable):
    """Runs the phases of one method; see the module docstring (checkpoints and resuming:
    resume.Resumable)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.phases = plan(cfg)
        self.dist = distributed.setup(cfg.device)
        self._gate_mean = distributed.averager(self.dist)  # gate gradients under DDP
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if cfg.device == "auto" else cfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.data = load_data(cfg)
        self.spec = self.data.task
        self.model, self.tokenizer = load_model(cfg.model, head_config(self.spec), cfg.seed)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self._prepare_model()
        self.model.to(self.device)
        self.autocast = _autocast_dtype(cfg.precision, self.device)
        train_rows = subsample(self.data.train, cfg.max_train_samples, cfg.seed)
        dev_rows = {k: subsample(v, cfg.max_eval_samples, cfg.seed)
                    for k, v in self.data.dev.items()}
        self.train_items = tokenize(self.tokenizer, train_rows, cfg.max_length)
        self.dev_items = {k: tokenize(self.tokenizer, v, cfg.max_length)
                          for k, v in dev_rows.items()}
        self.pos = {"phase": 0, "epoch": 0, "batch": 0, "global_step": 0, "phase_started": False}
        self.results: dict = {"phases": {}}
        self.best: dict | None = None
        self.controller: DensityController | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.elapsed = 0.0
        self._stop = False

    # --- what a method changes (PeftTrainer in peers.py overrides these) -----------------
    def _prepare_model(self) -> None:
        """theta = theta0 + z * w on every parameter (biases only for BitFit); head dense."""
        cfg = self.cfg
        targets = (r"\.bias$",) if cfg.method == "bitfit" else (".*",)
        first_stage = "dense" if self.phases[0].stage == "fixed" else self.phases[0].stage
        prepare_(self.model, DiffPruneConfig(target_patterns=targets, structured=cfg.structured,
                                             init_log_alpha=cfg.init_log_alpha,
                                             gate_grad=cfg.gate_grad), first_stage)
        get_state(self.model).seed_noise(cfg.seed)  # one gate sample per step on all ranks

    def _param_groups(self, phase: Phase) -> list[dict]:
        return param_groups(self.model, phase.lr, self._lr_gate(phase), self.cfg.lr_head,
                            self.cfg.weight_decay)

    def _lr_gate(self, phase: Phase) -> float:
        if self.cfg.lr_gate is not None:
            return self.cfg.lr_gate
        return max(0.1, 100.0 / max(1, self._gated_steps(phase)))

    def _density(self) -> float:
        return expected_density(self.model)

    def _save_artifact(self) -> dict:
        """Write the per-task artifact (the sparse diff) and return its size statistics."""
        diff = SparseDiff.from_model(self.model, base_model=self.cfg.model,
                                     metadata=self._diff_metadata(),
                                     values_dtype=self.cfg.values_dtype)
        path = diff.save(self.out / "diff")
        state = get_state(self.model)
        dense = sum(v.numel() for v in diff.dense.values())
        return {"artifact": str(path), "artifact_bytes": _dir_bytes(path),
                "density": diff.nnz / state.numel(), "nnz": diff.nnz,
                "gated_params": state.numel(), "dense_params": dense,
                "stored_params": diff.nnz + dense, "position_bits_per_nnz": diff.position_bits()}

    # --- phase set-up -------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return (len(self.train_items) + self.cfg.batch_size - 1) // self.cfg.batch_size

    def _enter_phase(self, phase: Phase) -> None:
        if phase.stage == "fixed" and get_state(self.model).stage != "fixed":
            if self.cfg.method == "random":
                k = random_mask_(self.model, density=self.cfg.density, seed=self.cfg.seed)
                self.results["projection"] = {"k": k, "random": True}
            else:
                report = project_(self.model, density=self.cfg.density,
                                  score=self.cfg.projection)
                self.results["projection"] = dataclasses.asdict(report)
            if self.dist.enabled:  # ranks holding different masks would hang in DDP
                distributed.check_same(_mask_crc(get_state(self.model)), self.dist,
                                       "projected mask (crc32 of its positions)")
            self.model.to(self.device)
            self.results["projection"]["dev"] = self._eval()
            self._log({"event": "projection", **self.results["projection"]})
        self._make_optimizer(phase)
        self.controller = self._make_controller(phase)

    def _make_controller(self, phase: Phase) -> DensityController | None:
        if phase.stage != "l0" or self.cfg.sparsity != "controller":
            return None
        return DensityController(self.cfg.density, self._gated_steps(phase),
                                 self.cfg.controller_warmup, self.cfg.controller_schedule)

    def _phase_steps(self, phase: Phase) -> int:
        return phase.epochs * self.steps_per_epoch()

    def _warm_steps(self, phase: Phase) -> int:
        """Steps of the L0 phase with the gates held open (--dense-warmup)."""
        if phase.stage != "l0":
            return 0
        return int(self.cfg.dense_warmup * self._phase_steps(phase))

    def _gated_steps(self, phase: Phase) -> int:
        """Steps of the L0 phase in which the gates learn (after the dense warm-up)."""
        return self._phase_steps(phase) - self._warm_steps(phase)

    def _hold_gates(self, phase: Phase, step_in_phase: int) -> None:
        """Hold the gates open during the dense warm-up; start them when it ends."""
        warm = self._warm_steps(phase)
        if not warm:
            return
        state = get_state(self.model)
        state.hold_open = step_in_phase < warm
        if step_in_phase == warm and self.cfg.gate_init == "magnitude":
            state.init_gates_from_w_(self.cfg.gate_init_scale)

    def _make_optimizer(self, phase: Phase) -> None:
        groups = self._param_groups(phase)
        for g in groups:
            g["initial_lr"] = g["lr"]
            g["shared_rms"] = g["name"] in GATE_GROUPS and self.cfg.gate_update == "shared_rms"
        if phase.stage == "l0":
            self.results["lr_gate"] = self._lr_gate(phase)
        trainable = sum(p.numel() for g in groups for p in g["params"])
        self.results["trainable_params"] = max(trainable, self.results.get("trainable_params", 0))
        # fused=True: one kernel over all tensors (CPU and CUDA); the step over ~2N diff and
        # gate parameters is a large share of a small-batch step.
        self.optimizer = DiffAdamW(groups, lr=phase.lr, fused=True)
        ignore = ()
        if phase.stage == "l0":
            # The gates' AdamW step inside the fused gate's backward (no N-sized gate
            # gradient): exact when nothing else touches that gradient (no penalty term,
            # Adam's own normalisation; gates are never clipped). Under DDP each span's
            # gradient is averaged across ranks there, and DDP leaves the gates alone.
            state = get_state(self.model)
            state.gate_step = (GateStep(self.optimizer, reduce=self._gate_mean)
                               if self.cfg.gate_step_in_backward
                               and self.cfg.sparsity == "controller"
                               and self.cfg.gate_update == "adam" else None)
            ignore = tuple(state.log_alpha) if state.gate_step is not None else ()
            self.results["gate_step_in_backward"] = state.gate_step is not None
        self.net = distributed.wrap(self.model, self.dist, self.device,  # DDP when launched so
                                    find_unused=self._warm_steps(phase) > 0, ignore=ignore)

    # --- one step -----------------------------------------------------------------------
    def _lr_factor(self, phase: Phase, step_in_phase: int) -> float:
        return max(0.0, 1.0 - step_in_phase / max(1, self._phase_steps(phase)))  # linear to 0

    def _step(self, phase: Phase, batch: dict, step_in_phase: int) -> dict:
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * self._lr_factor(phase, step_in_phase)
        info = {}
        self._hold_gates(phase, step_in_phase)
        holding = phase.stage == "l0" and get_state(self.model).hold_open
        if self.controller is not None and not holding:
            info["density"] = self.controller.step(self.model)  # before the forward uses it
        # from_pretrained returns the model in eval mode, and evaluation restores the mode it
        # found: training steps need train mode (dropout, sampled gates in the L0 phase)
        self.net.train()
        with torch.autocast(self.device.type, self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            loss = self.net(**batch).loss.float()
        total = loss
        info["loss"] = float(loss.detach())
        if phase.stage == "l0" and self.controller is None and not holding:
            penalty = l0_penalty(self.model)
            total = total + self.cfg.l0_lambda * penalty
            info["density"] = float(penalty.detach()) / get_state(self.model).numel()
        total.backward()
        clip = [p for g in self.optimizer.param_groups if g["name"] not in GATE_GROUPS
                for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(clip, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return info

    def _eval(self) -> dict:
        return evaluate(self.model, self.tokenizer, self.spec, self.dev_items,
                        self.cfg.batch_size, self.device)

    # --- main loop ----------------------------------------------------------------------
    def run(self) -> dict:
        if self.cfg.resume and ckpt.exists(self.out / "checkpoint"):
            self._restore()
        elif self.cfg.resume:
            log.warning("no checkpoint in %s: starting from scratch", self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.pos["global_step"]:
            torch.manual_seed(self.cfg.seed + self.dist.rank)  # dropout; restored on resume
        handlers = self._install_signal_handlers()
        start = time.perf_counter() - self.elapsed
        try:
            self._run_phases(start)
            self.elapsed = time.perf_counter() - start
            if self._stop:  # asked after the last step: the final files take seconds
                log.warning("stop asked for after training ended: writing the results first")
            # still under the handlers: a stop asked for now waits for the files, rather than
            # ending the run without them (it would resume from its last epoch's checkpoint)
            return self._finish()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _run_phases(self, start: float) -> None:
        steps = self.steps_per_epoch()
        for pi in range(self.pos["phase"], len(self.phases)):
            phase = self.phases[pi]
            if not self.pos["phase_started"]:
                self._enter_phase(phase)
                self.pos["phase_started"] = True
            bar = tqdm(total=phase.epochs * steps, initial=self.pos["epoch"] * steps +
                       self.pos["batch"], desc=f"{self.cfg.method}:{phase.name}",
                       dynamic_ncols=True, disable=None if self.dist.main else True)
            for epoch in range(self.pos["epoch"], phase.epochs):
                order = torch.randperm(len(self.train_items), generator=torch.Generator()
                                       .manual_seed(self.cfg.seed * 1000 + pi * 100 + epoch))
                for b in range(self.pos["batch"], steps):
                    idx = order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size].tolist()
                    if len(idx) < self.dist.world:  # too few to give every rank one
                        continue
                    batch = collate(self.tokenizer, [self.train_items[i] for i in
                                                     distributed.shard(idx, self.dist)],
                                    self.device)
                    info = self._step(phase, batch, epoch * steps + b)
                    self.pos.update(batch=b + 1, global_step=self.pos["global_step"] + 1)
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
                    if self.pos["global_step"] % 50 == 0:
                        self._log({"phase": phase.name, "epoch": epoch,
                                   "step": self.pos["global_step"], **info})
                    if self._should_stop():
                        self.elapsed = time.perf_counter() - start
                        self._checkpoint()
                        bar.close()
                        raise TrainingInterrupted(
                            f"stopped after step {self.pos['global_step']}; continue with "
                            f"--resume (checkpoint in {self.out / 'checkpoint'})")
                    if self.pos["global_step"] % self.cfg.save_every == 0:
                        self.elapsed = time.perf_counter() - start
                        self._checkpoint()
                self._end_epoch(pi, phase, epoch)
                self.pos.update(epoch=epoch + 1, batch=0)
                self.elapsed = time.perf_counter() - start
                self._checkpoint()
            bar.close()
            self.results["phases"][phase.name] = self._phase_summary(pi, phase)
            self.pos.update(phase=pi + 1, epoch=0, batch=0, phase_started=False)

    def _should_stop(self) -> bool:
        limit = self.cfg.stop_after_steps
        stop = self._stop or (limit is not None and self.pos["global_step"] >= limit)
        return distributed.any_rank(stop, self.dist)  # every rank stops at the same step

    def _end_epoch(self, pi: int, phase: Phase, epoch: int) -> None:
        metrics = self._eval()
        record = {"event": "eval", "phase": phase.name, "epoch": epoch, "dev": metrics,
                  "expected_density": self._density()}
        self._log(record)
        # the dev curve travels in results.json; the checkpoint that follows keeps it, so a
        # resumed run records each epoch once
        self.results.setdefault("epochs", []).append(
            {"phase": phase.name, "epoch": epoch, "score": metrics["score"],
             "expected_density": record["expected_density"]})
        log.info("%s epoch %d: dev %.2f, density %.5f", phase.name, epoch, metrics["score"],
                 record["expected_density"])
        if pi == len(self.phases) - 1 and (self.best is None or
                                           metrics["score"] > self.best["dev"]["score"]):
            self.best = {"epoch": epoch, "dev": metrics, "tensors": self._trainables()}

    def _phase_summary(self, pi: int, phase: Phase) -> dict:
        summary = {"expected_density": self._density()}
        if pi == len(self.phases) - 1 and self.best is not None:
            summary.update(dev=self.best["dev"], best_epoch=self.best["epoch"])
        else:
            summary["dev"] = self._eval()
        if self.controller is not None:
            summary["controller"] = self.controller.state_dict()
        return summary

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self._stop = True  # finish the current step, checkpoint, then stop
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _log(self, record: dict) -> None:
        if not self.dist.main:
            return
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # --- outputs --------------------------------------------------------------------------
    def _finish(self) -> dict:
        if self.best is not None:
            self._load_trainables(self.best["tensors"])
        final = self.best["dev"] if self.best else self._eval()
        if not self.dist.main:  # rank 0 writes; the others receive its results
            return distributed.gather(None, self.dist)[0]
        artifact = self._save_artifact()
        results = {
            "task": self.spec.name, "method": self.cfg.method, "seed": self.cfg.seed,
            "dev": final, "score": final["score"], "data_source": self.data.source,
            "train_examples": len(self.train_items), **artifact,
            "total_params": self.total_params, "wall_time_s": self.elapsed,
            "train_steps": self.pos["global_step"], "peak_memory_bytes": peak_memory(self.device),
            **self.results, "config": dataclasses.asdict(self.cfg),
        }
        results["world_size"] = self.dist.world
        atomic_write_bytes(self.out / "results.json", json.dumps(results, indent=1).encode())
        return distributed.gather(results, self.dist)[0]

    def _diff_metadata(self) -> dict:
        spec = self.spec
        return {"task": spec.name, "labels": list(spec.labels) if spec.labels else None,
                "metrics": list(spec.metrics), "pair": self.data.train[0]["text_pair"] is not None,
                "max_length": self.cfg.max_length, "method": self.cfg.method,
                "head": head_config(spec)}


def _mask_crc(state) -> int:
    """crc32 of every target's kept positions, in target order: equal masks, equal crc."""
    crc = 0
    for i in range(len(state.targets)):
        crc = zlib.crc32(state.indices(i).cpu().numpy().tobytes(), crc)
    return crc


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays (CUDA with bf16), fp32 otherwise; see TrainConfig.precision."""
    if precision == "fp32" or (precision == "auto" and not (
            device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg`` end to end; returns the results dict (also written to results.json)."""
    if cfg.method in PEFT_METHODS:
        from .peers import PeftTrainer  # needs the optional `peft` package
        trainer = PeftTrainer(cfg)
    else:
        trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        distributed.teardown(trainer.dist)
