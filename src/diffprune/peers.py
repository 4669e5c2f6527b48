"""Peer methods for comparison, through PEFT's public API: LoRA and SHiRA.

LoRA (Hu et al. 2022) adds B @ A of rank r to a linear layer; SHiRA (Bhardwaj et al. 2024)
trains a fixed random sparse set of r * (in + out) entries per linear layer, the nearest
relative of diff pruning. Both run in diffprune's training loop (same data, tokenisation,
schedule, seeds and evaluation) with the task head trained densely (PEFT's
``modules_to_save``); only what the method changes and stores differs. The rank is chosen so
that the trainable adapter parameters come nearest to ``density`` of the base model, the budget
diff pruning gets. The artifact is PEFT's own ``save_pretrained`` directory.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_DENSE_PATTERNS
from .errors import ConfigError
from .fileio import atomic_write_dir
from .inject import _matches
from .recipe import Phase
from .train import Trainer, _dir_bytes

ADAPTER_DIR = "adapter"


def _is_head(name: str) -> bool:
    return _matches(name, DEFAULT_DENSE_PATTERNS)


def linear_targets(model: nn.Module) -> list[str]:
    """Names of every nn.Linear outside the task head (LoRA's usual 'all linear layers')."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_head(n)]


def params_per_rank(model: nn.Module, targets: list[str]) -> int:
    """Adapter parameters per unit of r: LoRA's A and B, and SHiRA's r * (in + out), alike."""
    modules = dict(model.named_modules())
    return sum(modules[n].in_features + modules[n].out_features for n in targets)


def base_params(model: nn.Module) -> int:
    """Parameters outside the task head: the base the budget is a share of."""
    return sum(p.numel() for n, p in model.named_parameters() if not _is_head(n))


def rank_for_budget(model: nn.Module, targets: list[str], density: float, base: int) -> int:
    """The r >= 1 whose adapter size is nearest to density * base."""
    return max(1, round(density * base / params_per_rank(model, targets)))


def wrap(model: nn.Module, method: str, rank: int, seed: int) -> nn.Module:
    """The PEFT model for ``method`` ('lora' or 'shira') on all linear layers, head dense."""
    try:
        from peft import LoraConfig, ShiraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError(f"method {method!r} needs `pip install peft`") from None
    targets = linear_targets(model)
    if not targets:
        raise ConfigError(f"method {method!r}: the model has no linear layers to adapt")
    common = {"task_type": TaskType.SEQ_CLS, "r": rank, "target_modules": targets}
    if method == "lora":  # alpha = 2r: the common choice that keeps the update scale fixed in r
        config = LoraConfig(lora_alpha=2 * rank, lora_dropout=0.0, **common)
    elif method == "shira":
        config = ShiraConfig(random_seed=seed, **common)
    else:
        raise ConfigError(f"unknown PEFT method {method!r}; choose lora or shira")
    torch.manual_seed(seed)  # LoRA's A initialisation
    return get_peft_model(model, config)


class PeftTrainer(Trainer):
    """diffprune's loop on a PEFT-wrapped model: one 'adapter' phase, PEFT's saved adapter."""

    def _prepare_model(self) -> None:
        cfg = self.cfg
        self.base_params = base_params(self.model)
        self.rank = cfg.peft_rank or rank_for_budget(self.model, linear_targets(self.model),
                                                     cfg.density, self.base_params)
        self.model = wrap(self.model, cfg.method, self.rank, cfg.seed)

    def _split(self) -> tuple[list, list]:
        adapter, head = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (head if "modules_to_save" in n else adapter).append(p)
        return adapter, head

    def _param_groups(self, phase: Phase) -> list[dict]:
        adapter, head = self._split()
        wd = self.cfg.weight_decay
        return [{"name": "diff", "params": adapter, "lr": phase.lr, "weight_decay": wd},
                {"name": "dense", "params": head, "lr": self.cfg.lr_head, "weight_decay": wd}]

    def _density(self) -> float:
        return sum(p.numel() for p in self._split()[0]) / self.base_params

    def _trainables(self) -> dict[str, torch.Tensor]:
        return {f"peft.{n}": p.detach().clone() for n, p in self.model.named_parameters()
                if p.requires_grad}

    def _load_trainables(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(tensors[f"peft.{n}"])

    def _save_artifact(self) -> dict:
        """PEFT's save_pretrained, written to a temp dir and swapped in atomically."""
        tmp = Path(tempfile.mkdtemp(dir=self.out))
        try:
            self.model.save_pretrained(tmp)
            # PEFT's own files; not the model-card README it writes beside them
            files = {f.name: f.read_bytes() for f in tmp.iterdir()
                     if f.is_file() and f.suffix in (".json", ".safetensors")}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path = self.out / ADAPTER_DIR
        atomic_write_dir(path, files)
        adapter, head = self._split()
        n_adapter, n_head = sum(p.numel() for p in adapter), sum(p.numel() for p in head)
        return {"artifact": str(path), "artifact_bytes": _dir_bytes(path),
                "density": n_adapter / self.base_params, "nnz": n_adapter, "rank": self.rank,
                "gated_params": self.base_params, "dense_params": n_head,
                "stored_params": n_adapter + n_head}
