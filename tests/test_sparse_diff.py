import json
import shutil

import pytest
import torch
from conftest import batch, tiny_bert, tiny_gpt2_cls, train_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

import diffprune as dp
from diffprune.sparse_diff import CONFIG_NAME, WEIGHTS_NAME


def _trained(make=tiny_bert, density=0.05, steps=3):
    model = train_steps(dp.prepare_(make()), steps, lam=1e-4)
    dp.project_(model, density=density)
    return train_steps(model, steps)  # fixed-mask phase


@pytest.fixture(scope="module")
def trained():
    model = _trained()
    return model, dp.SparseDiff.from_model(model, base_model="tiny-bert", metadata={"task": "t"})


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffs") / "d"
    trained[1].save(path)
    return path


def test_save_load_identical(trained, saved):
    diff = trained[1]
    loaded = dp.SparseDiff.load(saved)
    assert loaded.base_fingerprint == diff.base_fingerprint and loaded.metadata == {"task": "t"}
    assert loaded.config == diff.config and loaded.nnz == diff.nnz
    for a, b in zip(diff.tensors, loaded.tensors):
        assert a.name == b.name and a.shape == b.shape
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    for n, v in diff.dense.items():
        assert torch.equal(v, loaded.dense[n])


def test_apply_matches_prepared_model_and_restore_is_bit_exact(trained, saved):
    model, _ = trained
    base = tiny_bert()  # same seed: the same base weights
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    diff = dp.SparseDiff.load(saved)
    diff.apply_(base)
    b = batch(seed=7)
    assert torch.allclose(base(**b).logits, model(**b).logits, atol=1e-6)
    diff.restore_(base)
    for n, p in base.named_parameters():
        assert torch.equal(p, original[n]), n


def test_apply_twice_or_restore_without_apply_raise(saved):
    base = tiny_bert()
    diff = dp.SparseDiff.load(saved)
    with pytest.raises(dp.DiffPruneError, match="no diff is applied"):
        diff.restore_(base)
    diff.apply_(base)
    with pytest.raises(dp.DiffPruneError, match="already applied"):
        diff.apply_(base)


def test_wrong_base_raises_and_force_overrides(saved):
    diff = dp.SparseDiff.load(saved)
    other = tiny_bert(seed=1)
    with pytest.raises(dp.BaseMismatchError, match="fingerprint"):
        diff.apply_(other)
    diff.apply_(other, force=True)
    with pytest.raises(dp.BaseMismatchError, match="no parameter"):
        diff.apply_(tiny_gpt2_cls())
    with pytest.raises(dp.BaseMismatchError, match="task head"):
        diff.apply_(tiny_bert(num_labels=3))


def test_merge_reloads_with_auto_class(trained, saved, tmp_path):
    model, _ = trained
    diff = dp.SparseDiff.load(saved)
    out = diff.merge(tiny_bert(), tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    b = batch(seed=3)
    assert torch.allclose(reloaded(**b).logits, model(**b).logits, atol=1e-6)


def test_unprepare_merge_equals_prepared(trained):
    model = _trained()
    b = batch(seed=5)
    ref = model(**b).logits
    dp.unprepare_(model, merge=True)
    assert torch.equal(model(**b).logits, ref)


def test_gpt2_round_trip(tmp_path):
    model = _trained(tiny_gpt2_cls, density=0.1)
    diff = dp.SparseDiff.from_model(model)
    diff.save(tmp_path / "g")
    base = tiny_gpt2_cls()
    dp.SparseDiff.load(tmp_path / "g").apply_(base)
    b = batch()
    assert torch.allclose(base(**b).logits, model(**b).logits, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_values(trained, tmp_path, dtype):
    model, _ = trained
    diff = dp.SparseDiff.from_model(model, values_dtype=dtype)
    diff.save(tmp_path / dtype)
    loaded = dp.SparseDiff.load(tmp_path / dtype)
    assert loaded.tensors[0].values.dtype == getattr(torch, dtype)
    diff.values_dtype = "float32"
    diff.save(tmp_path / "f32")
    saved_bytes = (tmp_path / "f32" / WEIGHTS_NAME).stat().st_size - (
        tmp_path / dtype / WEIGHTS_NAME).stat().st_size
    assert saved_bytes >= 2 * diff.nnz - 64  # 2 bytes less per value (header may differ)
    for a, b in zip(diff.tensors, loaded.tensors):
        assert torch.allclose(a.values.float(), b.values.float(), rtol=1e-2, atol=1e-4)


def test_save_is_atomic_and_overwrites(trained, tmp_path):
    diff = trained[1]
    path = tmp_path / "d"
    diff.save(path)
    diff.save(path)  # overwrite in place
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp leftovers
    dp.SparseDiff.load(path)


def test_missing_or_not_a_diff(tmp_path):
    with pytest.raises(dp.DiffFormatError, match="not a diff directory"):
        dp.SparseDiff.load(tmp_path)


def test_hand_edited_config_is_refused(saved, tmp_path):
    path = tmp_path / "edited"
    shutil.copytree(saved, path)
    header = json.loads((path / CONFIG_NAME).read_text())
    header["tensors"][0]["nnz"] += 1
    (path / CONFIG_NAME).write_text(json.dumps(header))
    with pytest.raises(dp.DiffFormatError, match="edited"):
        dp.SparseDiff.load(path)
    header["format_version"] = 99
    (path / CONFIG_NAME).write_text(json.dumps(header))
    with pytest.raises(dp.DiffFormatError, match="format_version"):
        dp.SparseDiff.load(path)


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_corrupt_files_always_raise_diff_format_error(saved, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("corrupt") / "d"
    shutil.copytree(saved, path)
    name = data.draw(st.sampled_from([CONFIG_NAME, WEIGHTS_NAME]))
    raw = bytearray((path / name).read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate"]))
    if how == "flip":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    (path / name).write_bytes(bytes(raw))
    try:
        dp.SparseDiff.load(path)
    except dp.DiffFormatError:
        return
    # Only a change that leaves the JSON's meaning intact (e.g. its trailing newline cut) may
    # load, and then it must describe exactly the original diff.
    assert name == CONFIG_NAME
    assert json.loads(bytes(raw)) == json.loads((saved / CONFIG_NAME).read_bytes())


def _tiny(kind: str):
    from transformers import (MPNetConfig, MPNetForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)
    torch.manual_seed(0)
    common = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=80, num_labels=2)
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**common)).eval()
    return MPNetForSequenceClassification(MPNetConfig(**common)).eval()


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_roberta_and_mpnet_round_trip(kind, tmp_path):
    model = _trained(lambda: _tiny(kind), density=0.05)
    assert set(dp.get_state(model).dense_names) == {
        n for n, _ in _tiny(kind).named_parameters() if n.startswith("classifier.")}
    diff = dp.SparseDiff.from_model(model)
    diff.save(tmp_path / kind)
    base = _tiny(kind)
    dp.SparseDiff.load(tmp_path / kind).apply_(base)
    b = batch()
    assert torch.allclose(base(**b).logits, model(**b).logits, atol=1e-6)
