"""DiffAdamW: plain AdamW outside the gate groups; shared-RMS steps keep relative sizes."""
import copy

import pytest
import torch

from diffprune import optim
from diffprune.optim import DiffAdamW


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(2)]


def test_groups_without_shared_rms_are_exactly_adamw():
    a, b = _params(), _params()
    opt_a = torch.optim.AdamW([{"params": a, "lr": 1e-2, "weight_decay": 0.1}])
    opt_b = DiffAdamW([{"params": b, "lr": 1e-2, "weight_decay": 0.1, "shared_rms": False}])
    for step in range(4):
        grads = _params(seed=step + 1)
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.detach().clone(), g.detach().clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)


def test_shared_rms_steps_are_proportional_to_gradients():
    gates, other = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = DiffAdamW([{"params": [gates], "lr": 0.1, "weight_decay": 0.0, "shared_rms": True},
                     {"params": [other], "lr": 0.1, "weight_decay": 0.0}])
    grad = torch.tensor([1e-6, 1e-5, 1e-4, -1e-3])
    for _ in range(3):
        gates.grad, other.grad = grad.clone(), grad.clone()
        opt.step()
    # relative sizes survive (Adam would move every entry by the same ~lr per step) ...
    torch.testing.assert_close(gates / gates[0], grad / grad[0], rtol=1e-5, atol=0)
    # (Adam's eps = 1e-8 shortens the 1e-6 entry's step by 1%)
    torch.testing.assert_close(other.abs(), torch.full((4,), 0.3), rtol=2e-2, atol=0)
    # ... and the scale is set by the group's RMS: lr * g / rms per step, 3 steps
    rms = grad.double().pow(2).mean().sqrt()
    torch.testing.assert_close(gates.double(), -0.3 * grad.double() / rms, rtol=1e-4, atol=0)
    assert gates.grad is not None  # gradients are left in place for the caller to clear


def test_shared_rms_state_round_trips():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = DiffAdamW([{"params": [p], "lr": 0.1, "shared_rms": True}])
    p.grad = torch.arange(6.0)
    opt.step()
    clone = torch.nn.Parameter(p.detach().clone())
    opt2 = DiffAdamW([{"params": [clone], "lr": 0.1, "shared_rms": True}])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from a file
    for o, q in ((opt, p), (opt2, clone)):
        q.grad = torch.ones(6)
        o.step()
    assert torch.equal(p, clone)


@pytest.mark.parametrize("noise", ["counter", "counter-large", "stream"])
@pytest.mark.parametrize("kernel", [True, False])
def test_gate_step_inside_backward_matches_adamw(kernel, noise, monkeypatch):
    """optim.GateStep: the gates step inside the fused gate's backward (in 3 spans per
    tensor here; with torch's fused AdamW kernel or its formula in plain ops; with
    counter.py's kernels or the numpy stream) and keep no gradient; after 4 steps every w,
    log_alpha and head entry equals plain AdamW's (fused and unfused kernels) within 1e-6.
    "counter-large": tensors of 500 entries or more are not gated together, so they take
    GatedDelta's path, whose backward kernel also takes the AdamW step (backward_step)."""
    if not kernel:
        monkeypatch.setattr(optim, "_FUSED_ADAMW", None)
    import diffprune as dp
    from diffprune import counter, fused
    from diffprune.optim import GateStep
    from conftest import batch, tiny_bert
    monkeypatch.setattr(counter, "ENABLED", noise != "stream")
    if noise == "counter-large":
        monkeypatch.setattr(counter, "SMALL", 500)
        calls = []
        monkeypatch.setattr(counter.Kernels, "backward_step",
                            lambda self, *a: calls.append(1) or self._call(4, *a))
    monkeypatch.setattr(counter, "CHUNK", 600)  # the 99 x 16 embedding: 3 spans
    monkeypatch.setattr(fused, "CHUNK", 600)

    def run(in_backward: bool, fused_kernel: bool):
        model = dp.prepare_(tiny_bert(dropout=0.0), dp.DiffPruneConfig(init_log_alpha=1.0))
        state = dp.get_state(model)
        state.seed_noise(7)
        for i, w in enumerate(state.w):
            w.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
        opt = torch.optim.AdamW(dp.param_groups(model, 1e-2, 0.3, 1e-2), fused=fused_kernel)
        state.gate_step = GateStep(opt) if in_backward else None
        model.train()
        for step in range(4):
            for g in opt.param_groups:
                g["lr"] *= 0.9  # a schedule: GateStep reads the group's current lr
            model(**batch(seed=step)).logits.pow(2).sum().backward()
            if in_backward:
                assert all(a.grad is None for a in state.log_alpha)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert max(float((a - 1.0).abs().max()) for a in state.log_alpha) > 0.1  # moved
        return [p.detach().clone() for p in model.parameters()]

    ref = run(False, False)
    for got in (run(True, False), run(True, True), run(False, True)):
        for x, y in zip(ref, got):
            assert torch.allclose(x, y, atol=1e-6), (x - y).abs().max()
    if noise == "counter-large":
        assert calls  # the fused step ran (in the in-backward runs)
