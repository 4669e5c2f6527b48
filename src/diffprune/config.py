"""DiffPruneConfig: which parameters get a diff, and how the diff is gated.

One dataclass, validated on construction, with a JSON round-trip that rejects unknown keys.
Method: Guo, Rush & Kim, "Parameter-Efficient Transfer Learning with Diff Pruning" (ACL 2021).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import ConfigError

# Newly initialised task heads of Hugging Face models: trained densely, stored densely
# (their "base" value is a random initialisation, so a diff against it would mean nothing).
DEFAULT_DENSE_PATTERNS = (r"(^|\.)(classifier|score|qa_outputs)(\.|$)",)


@dataclass
class DiffPruneConfig:
    """Settings of a diff-pruned model (saved inside every diff)."""

    target_patterns: tuple[str, ...] = (".*",)
    """Regexes (``re.search`` on parameter names); a floating-point parameter matching any of
    them gets a diff theta0 + z * w."""
    exclude_patterns: tuple[str, ...] = ()
    """Regexes of parameters left untouched (frozen, no diff)."""
    dense_patterns: tuple[str, ...] = DEFAULT_DENSE_PATTERNS
    """Regexes of parameters trained densely with no gate and stored densely (task heads).
    They take precedence over ``target_patterns``."""
    structured: bool = True
    """Add one group gate per parameter tensor (the paper's structured diff pruning, Sec. 3.2)."""
    init_log_alpha: float = 5.0
    """Initial log_alpha of every gate (paper: 5, i.e. gates start almost surely open)."""
    stretch_left: float = -1.5
    """Left end l of the stretched interval of the hard-concrete gate (paper: -1.5)."""
    stretch_right: float = 1.5
    """Right end r of the stretched interval (paper: 1.5)."""
    temperature: float = 1.0
    """Temperature of the concrete relaxation (paper's code: 1)."""
    gate_grad: str = "sampled"
    """Gradient of the gates: 'sampled' (the paper: through the sampled hard-concrete gate) or
    'expected' (through d/dlog_alpha P(gate open); every gate learns every step, see fused.py)."""

    def __post_init__(self) -> None:
        for name in ("target_patterns", "exclude_patterns", "dense_patterns"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            for pattern in value:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as exc:
                    raise ConfigError(f"{name}: invalid regex {pattern!r}: {exc}") from None
            object.__setattr__(self, name, value)
        if not self.stretch_left < 0.0:
            raise ConfigError(f"stretch_left must be < 0, got {self.stretch_left}")
        if not self.stretch_right > 1.0:
            raise ConfigError(f"stretch_right must be > 1, got {self.stretch_right}")
        if self.gate_grad not in ("sampled", "expected"):
            raise ConfigError(f"gate_grad must be 'sampled' or 'expected', got {self.gate_grad!r}")
        if not self.temperature > 0.0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not -50.0 <= self.init_log_alpha <= 50.0:
            raise ConfigError(f"init_log_alpha must be in [-50, 50], got {self.init_log_alpha}")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "DiffPruneConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**data)

