"""Tiny random models shared by the tests (no downloads)."""
import logging

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
logging.getLogger("diffprune").setLevel(logging.ERROR)


def tiny_bert(num_labels: int = 2, seed: int = 0, dropout: float = 0.1, vocab_size: int = 99
              ) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
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


def train_steps(model, steps: int = 3, lam: float = 1e-2, lr: float = 1e-2):
    """A few AdamW steps on a fixed tiny batch (+ lam * expected L0 in the L0 stage)."""
    import diffprune as dp
    opt = torch.optim.AdamW(dp.param_groups(model, lr_diff=lr, lr_gate=0.1))
    model.train()
    b, labels = batch(), torch.tensor([0, 1, 0, 1])
    for _ in range(steps):
        loss = model(**b, labels=labels).loss
        if lam and dp.get_state(model).stage == "l0":
            loss = loss + lam * dp.l0_penalty(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# --- a tiny model directory with a tokenizer, and tiny task files, for CLI tests -------------
POS = ["good", "great", "fine", "lovely", "superb", "fun"]
NEG = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILL = ["the", "film", "was", "a", "movie", "plot", "very", "and", "it", "is"]


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILL, 4) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def write_tiny_glue(root):
    """SST-2, RTE and STS-B folders in the GLUE layout with tiny synthetic content."""
    (root / "SST-2").mkdir(parents=True)
    for split, n, seed in (("train", 48, 0), ("dev", 16, 1)):
        rows = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in _sentences(n, seed)]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (root / "STS-B").mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n, seed in (("train", 32, 2), ("dev", 12, 3)):
        pairs = zip(_sentences(n, seed), _sentences(n, seed + 10))
        rows = [head] + [f"{i}\tg\tf\ty\t{i}\ts\ts\t{a}\t{b}\t{2.5 * (ya + yb)}"
                         for i, ((a, ya), (b, yb)) in enumerate(pairs)]
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def write_tiny_model_dir(path, seed: int = 0, dropout: float = 0.1, vocab_size: int = 99):
    from transformers import BertTokenizerFast
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL + list("abcdefg")
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(path)
    model = tiny_bert(seed=seed, dropout=dropout, vocab_size=vocab_size)  # rows past the
    model.save_pretrained(path)  # tokenizer's are never read
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_model") / "m")


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory):
    return write_tiny_glue(tmp_path_factory.mktemp("glue"))
