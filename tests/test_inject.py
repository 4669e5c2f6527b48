import pytest
import torch
from conftest import batch, tiny_bert, tiny_gpt2_cls, tiny_gpt2_lm, train_steps

import diffprune as dp
from diffprune.errors import ConfigError, DiffPruneError


@pytest.mark.parametrize("structured", [True, False])
def test_base_is_bit_identical_after_training(structured):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp.prepare_(model, dp.DiffPruneConfig(structured=structured))
    train_steps(model)
    state = dp.get_state(model)
    for i, t in enumerate(state.targets):
        assert torch.equal(state.theta0(i), before[t.name]), t.name
    assert any(w.abs().sum() > 0 for w in state.w)  # the diff did move
    assert not torch.equal(model.classifier.weight, before["classifier.weight"])  # head trains
    dp.unprepare_(model, merge=False)
    for n, p in model.named_parameters():
        if not n.startswith("classifier."):
            assert torch.equal(p, before[n]), n


def test_report_and_selection():
    model = tiny_bert()
    cfg = dp.DiffPruneConfig(exclude_patterns=(r"embeddings\.",))
    dp.prepare_(model, cfg)
    report = dp.prepare_report(model)
    assert set(report.dense) == {"classifier.weight", "classifier.bias"}
    assert all("embeddings" in n for n in report.frozen)
    assert "bert.pooler.dense.weight" in report.gated  # pooler is diff-pruned, as in the paper
    assert report.gated_numel == dp.get_state(model).numel()


def test_nothing_matched_is_a_clear_error():
    with pytest.raises(ConfigError, match="no parameter matched"):
        dp.prepare_(tiny_bert(), dp.DiffPruneConfig(target_patterns=("nonexistent",)))


def test_bad_config_values_are_rejected():
    with pytest.raises(ConfigError, match="stretch_left"):
        dp.DiffPruneConfig(stretch_left=0.5)
    with pytest.raises(ConfigError, match="unknown config keys"):
        dp.DiffPruneConfig.from_dict({"structured": True, "lamda": 1})
    with pytest.raises(ConfigError, match="invalid regex"):
        dp.DiffPruneConfig(target_patterns=("(",))


def test_prepare_twice_and_penalty_outside_l0_raise():
    model = dp.prepare_(tiny_bert())
    with pytest.raises(DiffPruneError, match="already prepared"):
        dp.prepare_(model)
    dp.project_(model, density=0.1)
    with pytest.raises(DiffPruneError, match="L0 stage"):
        dp.l0_penalty(model)


def test_starts_at_base_function_and_eval_is_deterministic():
    model = tiny_bert()
    b = batch()
    ref = model(**b).logits
    dp.prepare_(model)
    assert torch.equal(model(**b).logits, ref)  # w = 0
    train_steps(model)
    assert torch.equal(model(**b).logits, model(**b).logits)


def test_one_mask_per_forward_in_training():
    model = dp.prepare_(tiny_bert(), dp.DiffPruneConfig(init_log_alpha=0.0))
    state = dp.get_state(model)
    for w in state.w:
        torch.nn.init.normal_(w)
    model.train()
    b = batch()
    torch.manual_seed(3)
    a = model(**b).logits
    b_ = model(**b).logits
    assert not torch.equal(a, b_)  # a new mask each forward
    torch.manual_seed(3)
    assert torch.equal(model(**b).logits, a)  # seeded: reproducible


def test_expected_l0_structured_product_form():
    model = dp.prepare_(tiny_bert())
    state = dp.get_state(model)
    with torch.no_grad():
        state.group_log_alpha.fill_(0.0)  # sigmoid(0 - c) = 1/2 with l=-r
        for a in state.log_alpha:
            a.fill_(100.0)
    assert torch.isclose(dp.l0_penalty(model), torch.tensor(state.numel() / 2.0))
    assert abs(dp.expected_density(model) - 0.5) < 1e-6


def test_gpt2_tied_embeddings_and_conv1d():
    model = tiny_gpt2_lm()
    b = batch()
    ref = model(**b).logits
    dp.prepare_(model)
    state = dp.get_state(model)
    tied = [t for t in state.targets if t.name == "transformer.wte.weight"][0]
    assert len(tied.owners) == 2  # wte and lm_head share one diff
    assert not any("lm_head" in t.name for t in state.targets)
    assert torch.equal(model(**b).logits, ref)
    model.train()
    out = model(**b, labels=b["input_ids"])
    out.loss.backward()
    assert model.lm_head.weight is model.transformer.wte.weight  # one theta per step
    dp.unprepare_(model, merge=True)
    assert model.lm_head.weight is model.transformer.wte.weight  # tie kept


def test_gpt2_classifier_head_is_dense():
    model = dp.prepare_(tiny_gpt2_cls())
    assert set(dp.prepare_report(model).dense) == {"score.weight"}


def test_training_forward_lets_go_of_thetas():
    """After a training forward the modules point at theta0 (autograd alone keeps the
    sampled thetas, freed as backward consumes them); gradients are those of the sampled
    model; an eval forward materialises the test-time thetas again; with gradient
    checkpointing on, the thetas stay where backward's recomputation finds them."""
    model = dp.prepare_(tiny_bert(dropout=0.0), dp.DiffPruneConfig(init_log_alpha=0.0))
    state = dp.get_state(model)
    for w in state.w:
        torch.nn.init.normal_(w, std=0.1)
    emb = model.bert.embeddings.word_embeddings
    i = next(k for k, t in enumerate(state.targets) if t.name.endswith("word_embeddings.weight"))
    model.train()
    b = batch()
    torch.manual_seed(3)
    model(**b).logits.sum().backward()
    assert emb.weight is state.theta0(i)
    grads = [w.grad.clone() for w in state.w]
    # the same sampled model under gradient checkpointing: thetas kept, same gradients
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)
    model(**b).logits.sum().backward()
    assert emb.weight is not state.theta0(i)
    assert all(torch.allclose(g, w.grad, atol=1e-6) for g, w in zip(grads, state.w))
    assert any(g.abs().sum() > 0 for g in grads)
    model.gradient_checkpointing_disable()
    model.eval()
    with torch.no_grad():
        model(**b)
    assert emb.weight is not state.theta0(i)  # the test-time theta, materialised
