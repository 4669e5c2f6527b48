"""prepare_ / unprepare_: turn any nn.Module into a diff-pruned one and back.

Selects parameters by regex on their names (like PEFT's target modules), freezes the base,
reports what matched, and installs the forward pre-hook that materialises theta0 + delta.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import rows
from .config import DiffPruneConfig
from .errors import ConfigError, DiffPruneError
from .parametrize import STATE_ATTR, DiffState, Target

log = logging.getLogger(__name__)
_HOOK_ATTR = "_diffprune_hook"


@dataclass
class PrepareReport:
    """What prepare_ matched: gated tensors, dense (head) tensors and frozen tensors."""

    gated: dict[str, int]
    dense: dict[str, int]
    frozen: dict[str, int]

    @property
    def gated_numel(self) -> int:
        return sum(self.gated.values())

    @property
    def dense_numel(self) -> int:
        return sum(self.dense.values())

    def summary(self) -> str:
        return (f"diff on {len(self.gated)} tensors ({self.gated_numel:,} params), "
                f"dense on {len(self.dense)} ({self.dense_numel:,}), "
                f"frozen {len(self.frozen)} ({sum(self.frozen.values()):,})")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / accelerate wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, STATE_ATTR):
        model = model.module
    return model


def get_state(model: nn.Module) -> DiffState:
    """The DiffState of a prepared model (raises a clear error if it is not prepared)."""
    state = getattr(unwrap(model), STATE_ATTR, None)
    if not isinstance(state, DiffState):
        raise DiffPruneError("model is not prepared for diff pruning: call diffprune.prepare_ first")
    return state


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), STATE_ATTR, None), DiffState)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, attr))
    return owners


def _materialize_hook(module: nn.Module, args) -> None:
    # a training forward gates embeddings by the rows it reads (rows.py); with gradient
    # checkpointing a module's forward may run again in backward: the whole theta then
    training = module.training and torch.is_grad_enabled()
    getattr(module, STATE_ATTR).materialize(
        stochastic=module.training, by_rows=training and not _checkpointing(module))


def _release_hook(module: nn.Module, args, output) -> None:
    # A training forward's thetas are needed by backward only (autograd keeps them): not
    # holding them here frees each one as its backward runs, up to a model's worth of memory
    # at the end of backward. Gradient checkpointing reruns module forwards in backward and
    # needs them where the forward left them.
    if module.training and torch.is_grad_enabled() and not _checkpointing(module):
        getattr(module, STATE_ATTR).release()


def _checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or attr in vars(model):
            return bool(getattr(model, attr))
    return False


def prepare_(model: nn.Module, config: DiffPruneConfig | None = None,
             stage: str = "l0") -> nn.Module:
    """Re-parametrize ``model`` in place as theta0 + delta; returns the model.

    Floating-point parameters matching ``config.dense_patterns`` stay ordinary trainable
    parameters; those matching ``target_patterns`` (and not ``exclude_patterns``) get a diff;
    everything else is frozen. Tied parameters are parametrized once.
    """
    config = config or DiffPruneConfig()
    if is_prepared(model):
        raise DiffPruneError("model is already prepared for diff pruning")
    owners = _owners(model)
    targets, theta0, report = [], [], PrepareReport({}, {}, {})
    for name, p in model.named_parameters():  # named_parameters drops tied duplicates
        if not p.is_floating_point():
            p.requires_grad_(False)
            report.frozen[name] = p.numel()
        elif _matches(name, config.dense_patterns):
            p.requires_grad_(True)
            report.dense[name] = p.numel()
        elif _matches(name, config.target_patterns) and not _matches(name, config.exclude_patterns):
            targets.append(Target(name, tuple(p.shape), owners[id(p)]))
            theta0.append(p.detach())
            report.gated[name] = p.numel()
        else:
            p.requires_grad_(False)
            report.frozen[name] = p.numel()
    if not targets:
        names = [n for n, _ in model.named_parameters()][:8]
        raise ConfigError(f"no parameter matched target_patterns={list(config.target_patterns)} "
                          f"(excluding dense/excluded ones); first parameter names: {names}")
    for target in targets:
        for module, attr in target.owners:
            del module._parameters[attr]
    state = DiffState(config, targets, theta0, list(report.dense), stage)
    state.report = report
    model.add_module(STATE_ATTR, state)
    setattr(model, _HOOK_ATTR, (model.register_forward_pre_hook(_materialize_hook),
                                model.register_forward_hook(_release_hook),
                                *rows.install(state)))
    state.materialize(stochastic=False)  # submodules are usable before the first forward
    log.info("diffprune: %s", report.summary())
    return model


@torch.no_grad()
def unprepare_(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the parametrization. ``merge=True`` bakes theta0 + delta (deterministic gates)
    into plain parameters; ``merge=False`` puts the untouched base parameters back."""
    model = unwrap(model)
    state = get_state(model)
    thetas = state.thetas(stochastic=False) if merge else [state.theta0(i) for i in
                                                           range(len(state.targets))]
    for target, theta in zip(state.targets, thetas):
        param = nn.Parameter(theta.detach().clone() if merge else theta, requires_grad=False)
        for module, attr in target.owners:
            module.__dict__.pop(attr, None)
            module._parameters[attr] = param  # one Parameter for all owners keeps ties
    for handle in getattr(model, _HOOK_ATTR):
        handle.remove()
    delattr(model, _HOOK_ATTR)
    delattr(model, STATE_ATTR)
    return model


def prepare_report(model: nn.Module) -> PrepareReport:
    return get_state(model).report
