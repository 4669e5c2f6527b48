"""Tasks, data loading and metrics."""
from .loaders import DataError, TaskData, load_files, load_task
from .metrics import compute as compute_metrics
from .tasks import TASKS, TaskSpec, get_task

__all__ = ["DataError", "TASKS", "TaskData", "TaskSpec", "compute_metrics", "get_task",
           "load_files", "load_task"]
