"""Tiny random models shared by the tests (no downloads)."""
import logging

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
logging.getLogger("diffprune").setLevel(logging.ERROR)


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2_config(**kw) -> GPT2Config:
    return GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=99, n_positions=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


def tiny_gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def tiny_gpt2_cls(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=3)).eval()


def batch(n: int = 4, length: int = 10, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 99, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


@pytest.fixture
def bert():
    return tiny_bert()
