"""Task registry: the nine GLUE tasks, the registry-shipped Rotten Tomatoes task, custom files.

A task says where its text and labels are, which labels exist (None for regression) and how
it is scored (GLUE's official metrics). Examples are plain dicts:
``{"text": str, "text_pair": str | None, "label": int | float}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    """How to read and score one task."""

    name: str
    metrics: tuple[str, ...]
    """Official metrics; the task score is their mean (GLUE convention), in percent."""
    labels: tuple[str, ...] | None
    """Label names in id order (Hugging Face ``nyu-mll/glue`` order); None for regression."""
    glue_dir: str | None = None
    text_cols: tuple[str | int, ...] = ()
    """Column names (or indices for header-less files) of the text and optional text pair."""
    label_col: str | int = "label"
    header: bool = True
    dev_files: dict[str, str] = field(default_factory=lambda: {"dev": "dev.tsv"})
    hub_config: str | None = None
    hub_text: tuple[str, ...] = ()
    hub_dev: dict[str, str] = field(default_factory=lambda: {"dev": "validation"})
    description: str = ""

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("cola", ("mcc",), BINARY, "CoLA", (3,), 1, header=False, hub_config="cola",
             hub_text=("sentence",), description="grammatical acceptability"),
    TaskSpec("sst2", ("accuracy",), BINARY, "SST-2", ("sentence",), "label", hub_config="sst2",
             hub_text=("sentence",), description="movie-review sentiment"),
    TaskSpec("mrpc", ("f1", "accuracy"), BINARY, "MRPC", ("#1 String", "#2 String"), "Quality",
             hub_config="mrpc", hub_text=("sentence1", "sentence2"), description="paraphrase"),
    TaskSpec("qqp", ("f1", "accuracy"), BINARY, "QQP", ("question1", "question2"),
             "is_duplicate", hub_config="qqp", hub_text=("question1", "question2"),
             description="duplicate questions"),
    TaskSpec("stsb", ("pearson", "spearman"), None, "STS-B", ("sentence1", "sentence2"),
             "score", hub_config="stsb", hub_text=("sentence1", "sentence2"),
             description="semantic similarity (regression)"),
    TaskSpec("mnli", ("accuracy",), ("entailment", "neutral", "contradiction"), "MNLI",
             ("sentence1", "sentence2"), "gold_label",
             dev_files={"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"},
             hub_config="mnli", hub_text=("premise", "hypothesis"),
             hub_dev={"matched": "validation_matched", "mismatched": "validation_mismatched"},
             description="natural language inference"),
    TaskSpec("qnli", ("accuracy",), NLI2, "QNLI", ("question", "sentence"), "label",
             hub_config="qnli", hub_text=("question", "sentence"), description="QA entailment"),
    TaskSpec("rte", ("accuracy",), NLI2, "RTE", ("sentence1", "sentence2"), "label",
             hub_config="rte", hub_text=("sentence1", "sentence2"),
             description="textual entailment"),
    TaskSpec("wnli", ("accuracy",), BINARY, "WNLI", ("sentence1", "sentence2"), "label",
             hub_config="wnli", hub_text=("sentence1", "sentence2"),
             description="Winograd NLI"),
]}

ROTTEN = TaskSpec("rotten", ("accuracy",), ("negative", "positive"),
                  description="Rotten Tomatoes sentence sentiment (Pang & Lee snippets rated by "
                              "Hutto & Gilbert 2014, shipped in vaderSentiment 3.3.2 on PyPI)")

TASKS: dict[str, TaskSpec] = {**GLUE_TASKS, ROTTEN.name: ROTTEN}


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                          "(or use --train-file/--dev-file for your own data)")
    return TASKS[key]


def custom_task(name: str, labels: list[str] | None, has_pair: bool) -> TaskSpec:
    """A task read from the user's own files (accuracy / Pearson-Spearman)."""
    metrics = ("pearson", "spearman") if labels is None else ("accuracy",)
    return TaskSpec(name, metrics, None if labels is None else tuple(labels),
                    text_cols=("text", "text_pair") if has_pair else ("text",))
