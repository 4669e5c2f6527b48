"""diffprune: parameter-efficient transfer learning by diff pruning.

Guo, Rush & Kim, "Parameter-Efficient Transfer Learning with Diff Pruning", ACL 2021.
"""
from .bank import DiffBank
from .config import DiffPruneConfig
from .errors import BaseMismatchError, ConfigError, DiffFormatError, DiffPruneError
from .inject import PrepareReport, get_state, is_prepared, prepare_, prepare_report, unprepare_
from .penalty import DensityController, expected_density, l0_penalty, param_groups
from .project import ProjectionReport, project_, random_mask_
from .sparse_diff import SparseDiff, fingerprint

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError", "ConfigError", "DensityController", "DiffBank", "DiffFormatError",
    "DiffPruneConfig", "DiffPruneError", "PrepareReport", "ProjectionReport", "SparseDiff",
    "expected_density", "fingerprint", "get_state", "is_prepared", "l0_penalty",
    "param_groups", "prepare_", "prepare_report", "project_", "random_mask_", "unprepare_",
]
