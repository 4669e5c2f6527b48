"""DiffBank: exact switching and mixed-task batches on a tiny BERT and a tiny GPT-2."""
import pytest
import torch
from conftest import batch, tiny_bert, tiny_gpt2_cls

import diffprune as dp
from diffprune.bank import DiffBank


def _random_diff(make, seed, density=0.05):
    model = dp.prepare_(make())
    g = torch.Generator().manual_seed(seed)
    state = dp.get_state(model)
    with torch.no_grad():
        for w, a in zip(state.w, state.log_alpha):
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
            a.copy_(torch.randn(a.shape, generator=g) * 3)
        for n in state.dense_names:
            p = model.get_parameter(n)
            p.copy_(torch.randn(p.shape, generator=g))
    dp.project_(model, density=density)
    return model.eval(), dp.SparseDiff.from_model(model)


@pytest.fixture
def bank_and_models():
    tasks = {"a": lambda: tiny_bert(num_labels=2), "b": lambda: tiny_bert(num_labels=3),
             "c": lambda: tiny_bert(num_labels=1)}
    bank = DiffBank(tiny_bert(num_labels=2))
    models = {}
    for i, (name, make) in enumerate(tasks.items()):
        models[name], diff = _random_diff(make, seed=i)
        bank.add(name, diff)
    return bank, models


def test_activate_switch_and_restore_are_exact(bank_and_models):
    bank, models = bank_and_models
    base = {n: p.clone() for n, p in bank.model.named_parameters()}
    b = batch()
    for name in ["a", "b", "c", "a"]:
        bank.activate(name)
        assert torch.allclose(bank.model(**b).logits, models[name](**b).logits, atol=1e-6)
    bank.deactivate()
    for n, p in bank.model.named_parameters():
        assert torch.equal(p, base[n]), n
    assert bank.tasks() == ["a", "b", "c"]
    bank.drop("b")
    assert bank.tasks() == ["a", "c"]
    with pytest.raises(dp.DiffPruneError, match="unknown task 'b'"):
        bank.activate("b")


def test_parameters_are_packed_and_a_switch_is_one_write(bank_and_models):
    bank, _ = bank_and_models
    storages = {p.untyped_storage().data_ptr() for p in bank.model.parameters()}
    assert len(storages) == 1  # one flat float32 buffer behind every parameter
    for name in bank.tasks():
        (buffer, idx, base, task), = bank._switch[name].writes
        assert idx.shape == base.shape == task.shape == (bank.diffs[name].nnz,)
        assert torch.equal(buffer[idx], base)  # the values it restores are the base's


def test_mixed_batch_equals_each_row_through_its_own_model(bank_and_models):
    bank, models = bank_and_models
    b = batch(n=7, seed=3)
    tasks = ["a", "b", "c", "b", "a", "c", "c"]
    base = {n: p.clone() for n, p in bank.model.named_parameters()}
    out = bank.forward_mixed(tasks, **b)
    for i, t in enumerate(tasks):
        row = {k: v[i:i + 1] for k, v in b.items()}
        ref = models[t](**row).logits[0]
        assert out[i].shape == ref.shape
        assert torch.allclose(out[i], ref, atol=1e-5), (t, out[i], ref)
    for n, p in bank.model.named_parameters():  # no weight changed
        assert torch.equal(p, base[n])


def test_mixed_batch_gpt2_conv1d():
    bank = DiffBank(tiny_gpt2_cls())
    models = {}
    for i, name in enumerate(["x", "y"]):
        models[name], diff = _random_diff(tiny_gpt2_cls, seed=10 + i)
        bank.add(name, diff)
    b = batch(n=4)
    tasks = ["x", "y", "y", "x"]
    out = bank.forward_mixed(tasks, **b)
    for i, t in enumerate(tasks):
        ref = models[t](**{k: v[i:i + 1] for k, v in b.items()}).logits[0]
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_wrong_base_is_refused_and_memory_counts_diffs(bank_and_models):
    bank, _ = bank_and_models
    _, foreign = _random_diff(lambda: tiny_bert(seed=9), seed=0)
    with pytest.raises(dp.BaseMismatchError):
        bank.add("foreign", foreign)
    assert "foreign" not in bank.tasks()
    model_bytes = sum(p.nbytes for p in bank.model.parameters())
    assert 0 < bank.nbytes() < 3 * model_bytes


def test_add_while_a_task_is_active_and_replace(bank_and_models):
    bank, models = bank_and_models
    base = {n: p.clone() for n, p in bank.model.named_parameters()}
    bank.activate("a")
    new_model, new_diff = _random_diff(lambda: tiny_bert(num_labels=2), seed=42)
    bank.add("d", new_diff)  # precomputed against the base, not against task a
    assert bank.active == "a"
    b = batch()
    bank.activate("d")
    assert torch.allclose(bank.model(**b).logits, new_model(**b).logits, atol=1e-6)
    bank.add("a", new_diff)  # replace the task "a"
    bank.activate("a")
    assert torch.allclose(bank.model(**b).logits, new_model(**b).logits, atol=1e-6)
    bank.deactivate()
    for n, p in bank.model.named_parameters():
        assert torch.equal(p, base[n]), n
