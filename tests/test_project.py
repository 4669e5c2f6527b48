import pytest
import torch
from conftest import batch, tiny_bert

import diffprune as dp
from diffprune.errors import ConfigError
from diffprune.project import top_k_positive


def _random_l0_model(seed=0, structured=True):
    model = dp.prepare_(tiny_bert(), dp.DiffPruneConfig(structured=structured))
    g = torch.Generator().manual_seed(seed)
    state = dp.get_state(model)
    with torch.no_grad():
        for w, a in zip(state.w, state.log_alpha):
            w.copy_(torch.randn(w.shape, generator=g))
            a.copy_(torch.randn(a.shape, generator=g) * 3)
    return model


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05, 0.5])
def test_projection_keeps_exactly_k_largest(density):
    model = _random_l0_model()
    state = dp.get_state(model)
    deltas = torch.cat([d.detach().reshape(-1) for d in state.deltas()])
    k = round(density * state.numel())
    report = dp.project_(model, density=density)
    assert report.kept == k
    kept = torch.cat([state.indices(i) for i in range(len(state.targets))])
    assert kept.numel() == k
    diff = dp.SparseDiff.from_model(model)
    assert diff.nnz == k
    # the kept magnitudes are the k largest of |delta|
    chosen = torch.cat([t.values for t in diff.tensors]).abs().sort().values
    assert torch.equal(chosen, deltas.abs().sort().values[-k:])


@pytest.mark.parametrize("structured", [True, False])
def test_expected_score_keeps_the_largest_p_open_times_w(structured):
    model = _random_l0_model(seed=3, structured=structured)
    state = dp.get_state(model)
    elem, group = state.logits()
    probs = [torch.sigmoid(a) for a in elem]  # c = log(-l/r) = 0 for l = -1.5, r = 1.5
    if structured:
        probs = [p * torch.sigmoid(group[i]) for i, p in enumerate(probs)]
    score = torch.cat([(p * w.abs()).detach().reshape(-1) for p, w in zip(probs, state.w)])
    deltas = torch.cat([d.detach().reshape(-1) for d in state.deltas()])
    k = round(0.02 * state.numel())
    dp.project_(model, density=0.02, score="expected")
    offsets = torch.tensor([0] + [t.numel for t in state.targets]).cumsum(0)
    kept = torch.cat([state.indices(i) + offsets[i] for i in range(len(state.targets))])
    assert torch.equal(kept.sort().values, torch.topk(score, k).indices.sort().values)
    values = torch.cat(list(state.values)).detach()
    assert torch.equal(values, deltas[kept])  # kept values are delta, as with score="delta"


def test_ties_are_broken_deterministically():
    scores = [torch.ones(10), torch.ones(5), torch.zeros(4)]
    out = top_k_positive(scores, 12)
    assert [o.tolist() for o in out] == [list(range(10)), [0, 1], []]
    assert [o.tolist() for o in top_k_positive(scores, 30)] == [list(range(10)),
                                                                list(range(5)), []]


def test_zeros_are_never_chosen_by_tie_breaking_fill_by_w():
    model = _random_l0_model()
    state = dp.get_state(model)
    with torch.no_grad():
        for a in state.log_alpha:
            a.fill_(-20.0)  # every gate closed: delta == 0 everywhere
        state.log_alpha[0].view(-1)[:3] = 20.0
    report = dp.project_(model, nnz=50)
    assert (report.by_delta, report.by_fill, report.short) == (3, 47, 0)
    model2 = _random_l0_model()
    with torch.no_grad():
        for a in dp.get_state(model2).log_alpha:
            a.fill_(-20.0)
        for w in dp.get_state(model2).w:
            w.zero_()
    report = dp.project_(model2, nnz=50, fill="w")
    assert (report.kept, report.short) == (0, 50)


def test_fixed_mask_training_changes_only_masked_entries_and_head():
    model = _random_l0_model()
    dp.project_(model, density=0.02)
    state = dp.get_state(model)
    before = [t.detach().clone() for t in state.thetas()]
    head = model.classifier.weight.detach().clone()
    opt = torch.optim.AdamW(dp.param_groups(model, lr_diff=1e-2), weight_decay=0.01)
    model.train()
    for _ in range(3):
        model(**batch(), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    changed_total = 0
    for i, (b, a) in enumerate(zip(before, state.thetas())):
        changed = torch.nonzero((a != b).reshape(-1)).squeeze(1)
        assert set(changed.tolist()) <= set(state.indices(i).tolist())
        changed_total += changed.numel()
    assert changed_total > 0
    assert not torch.equal(model.classifier.weight, head)


def test_budget_errors():
    model = _random_l0_model()
    with pytest.raises(ConfigError, match="density must be in"):
        dp.project_(model, density=1.5)
    with pytest.raises(ConfigError, match="exactly one"):
        dp.project_(model)


def test_random_mask_has_k_positions():
    model = _random_l0_model()
    k = dp.random_mask_(model, density=0.1, seed=1)
    state = dp.get_state(model)
    assert sum(state.indices(i).numel() for i in range(len(state.targets))) == k


@pytest.mark.parametrize("target", [0.001, 0.01, 0.2])
@pytest.mark.parametrize("structured", [True, False])
def test_density_controller_reaches_target(target, structured):
    model = _random_l0_model(structured=structured)
    ctl = dp.DensityController(target, total_steps=60, warmup_fraction=0.5)
    opt = torch.optim.AdamW(dp.param_groups(model, lr_diff=1e-2, lr_gate=0.1))
    model.train()
    for _ in range(60):
        ctl.step(model)
        model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    density = dp.expected_density(model)
    assert target / 1.2 < density < target * 1.2, density


def test_gates_held_open_then_started_from_magnitude():
    """While held open the model is theta0 + w and the gates get no gradient; then the gates
    start ordered by |w| (entries with w = 0 lowest) and the controller still lands."""
    model = _random_l0_model()
    state = dp.get_state(model)
    state.hold_open = True
    opt = torch.optim.AdamW(dp.param_groups(model, lr_diff=1e-2, lr_gate=0.1))
    model.train()
    for _ in range(3):
        model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        assert all(a.grad is None for a in state.log_alpha)
        opt.step()
        opt.zero_grad()
    expect = [(state.theta0(i) + w).detach() for i, w in enumerate(state.w)]
    got = [t.detach() for t in state.thetas(stochastic=True)]
    assert all(torch.equal(x, y) for x, y in zip(expect, got))
    with torch.no_grad():
        state.w[0].view(-1)[:5] = 0.0
    state.hold_open = False
    state.init_gates_from_w_(4.0)
    w = torch.cat([x.detach().reshape(-1) for x in state.w])
    a = torch.cat([x.detach().reshape(-1) for x in state.log_alpha])
    nz = w != 0
    assert a[~nz].max() < a[nz].min() + 1e-6  # never-moved entries at the bottom
    order = torch.argsort(w[nz].abs())
    assert (a[nz][order].diff() >= -1e-4).all()  # monotone in |w| (up to the floor)
    assert (a[nz] >= 5.0 - 1e-4).float().mean() > 0.98  # start nearly dense
    ctl = dp.DensityController(0.01, total_steps=40, warmup_fraction=0.5)
    for _ in range(40):
        ctl.step(model)
        model(**batch(), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    assert 0.01 / 1.2 < dp.expected_density(model) < 0.01 * 1.2
