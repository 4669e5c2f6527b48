"""The accelerators' flat gate (flat.py), run on CPU (and on a GPU where there is one): the
plain formulation's values and gradients, the gate logits' AdamW step in backward, and
training with it end to end."""
import json

import pytest
import torch
from test_cli import _train

import diffprune as dp
from diffprune import flat, fused, gates
from diffprune.optim import GateStep

SHAPES = [(7, 5), (13,), (4, 3, 2), (30,)]  # 102 entries: chunks of 16 cross the targets


def _inputs(seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    theta0s = [torch.randn(s, generator=g) for s in SHAPES]
    ws = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    alphas = [torch.randn(s, generator=g) * 2 for s in SHAPES]
    ups = [torch.randn(s, generator=g) for s in SHAPES]
    return tuple([t.to(device) for t in ts] for ts in (theta0s, ws, alphas, ups))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("expected_grad", [False, True])
def test_flat_gate_matches_the_plain_formula(expected_grad, chunk, device, monkeypatch):
    if chunk is not None:  # the chunk of the device's kind
        monkeypatch.setattr(fused, "CHUNK" if device == "cpu" else "GPU_CHUNK", chunk)
    theta0s, w0, a0, ups = _inputs(device=device)
    zg0 = torch.tensor([0.9, 0.5, 1.0, 0.7], device=device)
    shift, temp = torch.tensor(0.3, device=device), 2 / 3
    ws, alphas = ([t.clone().requires_grad_(True) for t in ts] for ts in (w0, a0))
    zg = zg0.clone().requires_grad_(True)
    gen = torch.Generator(device).manual_seed(5)
    thetas = flat.gated_thetas(theta0s, ws, alphas, shift, zg, -1.5, 1.5, temp, True,
                               expected_grad, gen)
    torch.rand(3, generator=gen, device=device)  # the generator moves on before backward
    sum((t * u).sum() for t, u in zip(thetas, ups)).backward()

    ref_gen = torch.Generator(device).manual_seed(5)
    n = sum(t.numel() for t in theta0s)
    u = torch.cat([torch.rand(s.stop - s.start, generator=ref_gen, device=device)
                   for s in fused._spans(n, fused.chunk_for(torch.device(device)))])
    w2, a2 = ([t.clone().requires_grad_(True) for t in ts] for ts in (w0, a0))
    zg2 = zg0.clone().requires_grad_(True)
    refs, start = [], 0
    for i, (t0, w, a) in enumerate(zip(theta0s, w2, a2)):
        z = gates.sample_gate(a + shift, u=u[start:start + a.numel()].view(a.shape),
                              temperature=temp)
        if expected_grad:  # the surrogate: d/da P(z != 0) in place of dz/da
            p = torch.sigmoid(a + shift)  # log(-l / r) = 0 for l = -1.5, r = 1.5
            z = z.detach() + (p - p.detach())
        refs.append(t0 + z * zg2[i] * w)
        start += a.numel()
    sum((t * u).sum() for t, u in zip(refs, ups)).backward()
    for x, y in zip(thetas, refs):
        assert torch.allclose(x, y, atol=1e-6)
    for x, y in [*zip(ws, w2), *zip(alphas, a2), (zg, zg2)]:
        assert torch.allclose(x.grad, y.grad, rtol=1e-5, atol=1e-6), (x.grad - y.grad).abs().max()
    assert (zg.grad != 0).all() and any((a.grad == 0).any() for a in alphas) != expected_grad


def test_gate_logits_step_inside_backward_as_adamw_would():
    """With a GateStep the logits take AdamW's step in backward (one multi-tensor call) and
    keep no gradient; the result equals torch's AdamW given the same gradients."""
    theta0s, w0, a0, ups = _inputs(1)
    zg, shift = torch.ones(len(SHAPES)), torch.tensor(0.0)
    alphas = [torch.nn.Parameter(a.clone()) for a in a0]
    opt = torch.optim.AdamW([{"params": alphas, "lr": 0.1, "name": "gates",
                              "weight_decay": 0.0}])
    ref_alphas = [torch.nn.Parameter(a.clone()) for a in a0]
    ref_opt = torch.optim.AdamW([{"params": ref_alphas, "lr": 0.1, "weight_decay": 0.0}])
    step = GateStep(opt)
    for k in range(3):  # three steps: the moments and the step count carry over
        gen, ref_gen = (torch.Generator().manual_seed(k) for _ in range(2))
        thetas = flat.gated_thetas(theta0s, w0, alphas, shift, zg, -1.5, 1.5, 1.0, True,
                                   True, gen, step)
        sum((t * u).sum() for t, u in zip(thetas, ups)).backward()
        assert all(a.grad is None for a in alphas)
        ref = flat.gated_thetas(theta0s, w0, ref_alphas, shift, zg, -1.5, 1.5, 1.0, True,
                                True, ref_gen)
        sum((t * u).sum() for t, u in zip(ref, ups)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for a, b in zip(alphas, ref_alphas):
            assert torch.allclose(a, b, atol=1e-6)
    assert float(opt.state[alphas[0]]["step"]) == 3


def test_training_through_the_flat_gate(tmp_path, tiny_model_dir, tiny_glue, monkeypatch):
    """The CLI on the accelerators' path (flat gate, torch generator), run on CPU: exactly
    k nonzeros, and a run stopped twice and resumed gives the same diff."""
    monkeypatch.setattr(flat, "ON_CPU", True)
    calls = []
    real = flat.GatedFlat.apply
    monkeypatch.setattr(flat.GatedFlat, "apply", lambda *a: calls.append(1) or real(*a))
    rc, ref = _train(tmp_path, tiny_model_dir, tiny_glue, name="ref")
    assert rc == 0 and calls
    results = json.loads((ref / "results.json").read_text())
    assert results["nnz"] == round(0.05 * results["gated_params"])
    assert _train(tmp_path, tiny_model_dir, tiny_glue, "--stop-after-steps", "2",
                  name="cut")[0] == 130
    assert _train(tmp_path, tiny_model_dir, tiny_glue, "--resume", "--stop-after-steps",
                  "12", name="cut")[0] == 130
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, "--resume", name="cut")
    assert rc == 0
    a, b = dp.SparseDiff.load(ref / "diff"), dp.SparseDiff.load(run / "diff")
    for x, y in zip(a.tensors, b.tensors):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values), x.name
    assert results["score"] == json.loads((run / "results.json").read_text())["score"]


def test_the_controllers_density_is_the_same_on_both_paths(monkeypatch):
    """penalty's density and slope over the concatenated gates equal the per-tensor sums
    (a tensor of 2^16 entries or more is read at every 8th gate on both)."""
    from conftest import tiny_bert

    from diffprune import penalty
    model = tiny_bert()
    dp.prepare_(model, dp.DiffPruneConfig(structured=True))
    state = dp.get_state(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in state.log_alpha:
            a.copy_(torch.randn(a.shape, generator=g) * 3)
        state.group_log_alpha.copy_(torch.randn(state.group_log_alpha.shape, generator=g))
        state.logit_shift.fill_(-0.7)
    assert max(a.numel() for a in state.log_alpha) < penalty._SUBSAMPLE_MIN
    monkeypatch.setattr(penalty, "_SUBSAMPLE_MIN", 64)  # some tensors subsampled
    per_tensor = penalty._density_and_slope(state)
    monkeypatch.setattr(flat, "ON_CPU", True)
    together = penalty._density_and_slope(state)
    assert together == pytest.approx(per_tensor, rel=1e-5)


def test_the_fixed_stage_scatters_the_same_thetas_on_both_paths(monkeypatch):
    """One scatter into the concatenation gives the per-target thetas bit for bit, and its
    gradient reaches every target's values; a load into the index buffers is seen."""
    from conftest import tiny_bert
    model = tiny_bert()
    dp.prepare_(model, dp.DiffPruneConfig())
    dp.random_mask_(model, density=0.05)
    state = dp.get_state(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in state.values:
            v.copy_(torch.randn(v.shape, generator=g))
    per_target = state.thetas()
    monkeypatch.setattr(flat, "ON_CPU", True)
    together = state.thetas()
    assert all(torch.equal(x, y) for x, y in zip(per_target, together))
    sum(t.sum() for t in together).backward()
    assert all(torch.equal(v.grad, torch.ones_like(v)) for v in state.values)
    with torch.no_grad():  # as a checkpoint's load does: new positions in the same buffers
        state.indices(0).copy_(torch.randperm(state.theta0(0).numel(), generator=g)[
            :state.indices(0).numel()].sort().values)
    monkeypatch.setattr(flat, "ON_CPU", False)
    expected = state.thetas()[0]
    monkeypatch.setattr(flat, "ON_CPU", True)
    assert torch.equal(state.thetas()[0], expected)


def test_a_half_precision_base_is_summed_in_float32_and_rounded_once():
    """A bf16 theta0 (a base loaded in bf16): theta = bf16(theta0 + z * zg * w), the sum in
    w's float32; w's gradient stays float32."""
    theta0s, w0, a0, ups = _inputs(2)
    base = [t.to(torch.bfloat16) for t in theta0s]
    ws = [w.clone().requires_grad_(True) for w in w0]
    zg, shift = torch.ones(len(SHAPES)), torch.tensor(0.0)
    thetas = flat.gated_thetas(base, ws, a0, shift, zg, -1.5, 1.5, 1.0, False, True)
    for t, t0, w, a in zip(thetas, base, w0, a0):
        ref = (t0.float() + gates.deterministic_gate(a) * w).to(torch.bfloat16)
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, ref, atol=0, rtol=2 ** -7)  # one bf16 rounding apart
    sum((t.float() * u).sum() for t, u in zip(thetas, ups)).backward()
    assert all(w.grad.dtype == torch.float32 and (w.grad != 0).any() for w in ws)


def test_the_flat_path_applies_where_its_noise_has_a_generator(monkeypatch):
    cpu = [torch.zeros(3), torch.zeros(2)]
    assert not flat.usable(cpu, None)  # the CPU keeps its compiled kernels ...
    monkeypatch.setattr(flat, "ON_CPU", True)
    assert flat.usable(cpu, None) and flat.usable(cpu, torch.Generator())  # ... unless asked
    assert not flat.usable([torch.zeros(3), torch.zeros(2, dtype=torch.float16)], None)
    # a device without a known global generator (here "meta") keeps the per-target path
    assert not flat.usable([torch.zeros(3, device="meta")], None)
