"""Embeddings gated by the rows a training forward reads (rows.py) against the whole tensor."""
import pytest
import torch
from conftest import tiny_bert
from torch import nn

import diffprune as dp
from diffprune import counter, rows
from diffprune.optim import GateStep

TOL = dict(rtol=1e-5, atol=1e-6)


def _prepared(model: nn.Module, by_rows: bool, gate_step: bool, structured: bool = True):
    dp.prepare_(model, dp.DiffPruneConfig(structured=structured, gate_grad="expected"))
    state = dp.get_state(model)
    state.seed_noise(3)
    if not by_rows:
        state.row_targets.clear()
    opt = torch.optim.AdamW(dp.param_groups(model, 1e-2, 0.1, 1e-2))
    if gate_step:
        state.gate_step = GateStep(opt)
    return state, opt


def _bert_steps(by_rows: bool, gate_step: bool, structured: bool, steps: int = 2):
    model = tiny_bert(dropout=0.0)
    state, opt = _prepared(model, by_rows, gate_step, structured)
    model.train()
    ids = torch.randint(1, 99, (4, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 9:] = 0  # padding, row 0 of the word embeddings
    mask = (ids != 0).long()
    losses, grads = [], []
    for step in range(steps):
        n = 12 if step % 2 == 0 else 9  # the odd steps without padding: row 0 unread
        loss = model(input_ids=ids[:, :n], attention_mask=mask[:, :n],
                     labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        opt.step()
        opt.zero_grad()
    return state, losses, grads, ids


@pytest.mark.parametrize("gate_step,structured", [(True, True), (False, True), (True, False)])
def test_rows_give_the_whole_tensors_training_steps(gate_step, structured, monkeypatch):
    """Two training steps of a tiny BERT (padded batch, then unpadded) with its two large
    embeddings gated by rows give the loss, every gradient and the gate logits after each
    AdamW step (inside backward or the optimizer's) of the whole-tensor gate, within 1e-6 /
    1e-5; the rows' Function ran, w's gradient is 0 at rows no id reads and at the padding
    row."""
    monkeypatch.setattr(counter, "SMALL", 100)  # word (99 x 16) and position (64 x 16) tables
    calls = []
    apply = rows.GatedRows.apply
    monkeypatch.setattr(rows.GatedRows, "apply", lambda *a: calls.append(1) or apply(*a))
    state, losses, grads, ids = _bert_steps(True, gate_step, structured)
    assert len(state.row_targets) == 2 and len(calls) == 4
    ref_state, ref_losses, ref_grads, _ = _bert_steps(False, gate_step, structured)
    assert len(calls) == 4  # the reference gated whole tensors
    for x, y in zip(losses, ref_losses):
        assert torch.allclose(x, y, **TOL)
    for g, ref in zip(grads, ref_grads):
        assert g.keys() == ref.keys() and len(g) > 3
        for name in g:
            assert torch.allclose(g[name], ref[name], **TOL), name
    for a, b in zip(state.log_alpha, ref_state.log_alpha):
        assert torch.allclose(a, b, **TOL)
    word = next(i for i in state.row_targets if state.targets[i].shape[0] == 99)
    unread = torch.ones(99, dtype=torch.bool)
    unread[ids.unique()] = False
    w_grad = grads[0][f"diffprune.w.{word}"]
    assert unread.any() and (w_grad[unread] == 0).all() and (w_grad[0] == 0).all()
    assert (w_grad[ids[0, 0]] != 0).any()


class _Twice(nn.Module):
    """One embedding read twice in a forward (as a siamese encoder would)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(300, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, a, b):
        return self.out(self.emb(a).mean(1) * self.emb(input=b).mean(1)).sum()


def test_an_embedding_read_twice_steps_its_gates_once(monkeypatch):
    """Both reads gated by rows (one positional, one keyword input), their gradients summed
    and one AdamW step of the logits: the same as the whole-tensor gate within 1e-6."""
    monkeypatch.setattr(counter, "SMALL", 100)
    a = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(2))
    results = []
    for by_rows in (True, False):
        model = _Twice()
        state, opt = _prepared(model, by_rows, gate_step=True)
        with torch.no_grad():  # w = 0 would give the gates no gradient
            state.w[0].copy_(torch.randn(300, 8, generator=torch.Generator().manual_seed(4)))
        model.train()
        model(a, b).backward()
        opt.step()
        results.append((state.w[0].detach().clone(), state.log_alpha[0].detach().clone(),
                        opt.state[state.log_alpha[0]]["step"].item()))
    assert results[0][2] == results[1][2] == 1
    assert torch.allclose(results[0][0], results[1][0], **TOL)
    assert torch.allclose(results[0][1], results[1][1], **TOL)


def test_ids_out_of_range_are_an_index_error():
    with pytest.raises(IndexError, match="out of range"):
        rows.local_rows(torch.tensor([[1, 5, 300]]), 300, padding_idx=None)
    got, local = rows.local_rows(torch.tensor([[7, 2, 7]]), 300, padding_idx=1)
    assert got.tolist() == [0, 1, 2, 7] and local.tolist() == [[3, 2, 3]]


def test_only_lone_plain_embeddings_are_gated_by_rows(monkeypatch):
    monkeypatch.setattr(counter, "SMALL", 100)
    tied = nn.Sequential(nn.Embedding(50, 4), nn.Linear(4, 50, bias=False))
    tied[1].weight = tied[0].weight
    capped = nn.Sequential(nn.Embedding(50, 4, max_norm=1.0))
    for model in (tied, capped):
        dp.prepare_(model, dp.DiffPruneConfig(target_patterns=(r"weight",)))
        assert not dp.get_state(model).row_targets
