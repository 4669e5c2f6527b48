"""counter.py: the compiled gate kernels equal the plain autograd formulation with the same
noise, and the counter-based noise is uniform and a function of (seed, position) alone."""
import math

import pytest
import torch

from diffprune import counter, gates
from diffprune.fused import GatedDelta


def _i32(v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def _run_fused(theta0, w0, a0, zg0, shift, upstream, temperature, expected, seed):
    w, a, zg = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
    theta = GatedDelta.apply(theta0, w, a, shift, zg, -1.5, 1.5, temperature, True, expected,
                             gates.CpuNoise(seed))
    (theta * upstream).sum().backward()
    return theta.detach(), w.grad, a.grad, zg.grad


def _plain_gate(a, shift, u, temperature, expected):
    """z of gates.sample_gate given u; with the expected-gradient surrogate as a
    straight-through term (forward value z, gradient that of P(z != 0))."""
    z = gates.sample_gate(a + shift, u=u, temperature=temperature)
    if not expected:
        return z
    p = torch.sigmoid(a + shift - temperature * math.log(1.5 / 1.5))
    return z.detach() + (p - p.detach())


def _run_plain(theta0, w0, a0, zg0, shift, upstream, temperature, expected, seed):
    """The plain formulation (_plain_gate) with counter.uniform's noise."""
    w, a, zg = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
    u = counter.uniform(counter.positions(a0.numel(), _i32(0)),
                        _i32(gates.CpuNoise(seed).seed32()))
    theta = theta0 + _plain_gate(a, shift, u.view(a0.shape), temperature, expected) * zg * w
    (theta * upstream).sum().backward()
    return theta.detach(), w.grad, a.grad, zg.grad


@pytest.mark.parametrize("chunk", [None, 500])
@pytest.mark.parametrize("expected", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2 / 3])
def test_kernels_match_autograd(temperature, expected, chunk, monkeypatch):
    """One span or five (2,112 entries, spans of 500): theta and every gradient equal the
    plain formulation's within 1e-6 (absolute) / 1e-5 (relative)."""
    monkeypatch.setattr(counter, "ENABLED", True)
    if chunk is not None:
        monkeypatch.setattr(counter, "CHUNK", chunk)
    torch.manual_seed(0)
    theta0, w0, a0 = torch.randn(64, 33), torch.randn(64, 33) * 0.1, torch.randn(64, 33) * 2
    zg0, shift, upstream = torch.tensor(0.7), torch.tensor(-0.4), torch.randn(64, 33)
    args = (theta0, w0, a0, zg0, shift, upstream, temperature, expected, 5)
    out, ref = _run_fused(*args), _run_plain(*args)
    for x, y in zip(out, ref):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()
    z = (out[0] - theta0) / (w0 * zg0)
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()  # all three
    if not expected:
        assert (out[2] == 0).any() and (out[2] != 0).any()  # clamped: no sampled gradient


def test_noise_is_uniform_and_a_function_of_seed_and_position():
    u = counter.uniform(counter.positions(1 << 20, _i32(0)), _i32(12345))
    assert abs(float(u.mean()) - 0.5) < 2e-3
    assert abs(float(u.var()) - 1 / 12) < 1e-3
    lo, hi = torch.tensor([gates._U_EPS, 1 - gates._U_EPS])  # float32, as u
    assert u.min() >= lo and u.max() <= hi
    lag1 = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]
    assert abs(float(lag1)) < 5e-3  # neighbours (consecutive counters) uncorrelated
    hist = torch.histc(u, bins=16, min=0.0, max=1.0) / u.numel()
    assert float((hist - 1 / 16).abs().max()) < 2e-3
    # a span starting at k is the same as positions k.. of the whole: spans are independent
    assert torch.equal(counter.uniform(counter.positions(1000, _i32(70_000)), _i32(12345)),
                       u[70_000:71_000])
    other = counter.uniform(counter.positions(1 << 20, _i32(0)), _i32(12346))
    assert float((other == u).float().mean()) < 1e-3
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 5e-3


def test_the_stream_moves_one_seed_per_tensor():
    """Each sampled tensor takes one seed from the noise generator, so two tensors in one
    step, or one tensor in two steps, never share noise; the same generator state gives
    the same sample (checkpoints, ranks)."""
    torch.manual_seed(0)
    theta0, w, a = torch.zeros(4000), torch.ones(4000), torch.zeros(4000)
    one, zg, shift = gates.CpuNoise(3), torch.tensor(1.0), torch.tensor(0.0)
    draws = [GatedDelta.apply(theta0, w, a, shift, zg, -1.5, 1.5, 1.0, True, True, one)
             for _ in range(2)]
    again = GatedDelta.apply(theta0, w, a, shift, zg, -1.5, 1.5, 1.0, True, True,
                             gates.CpuNoise(3))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], again)


def test_a_compiler_failure_falls_back_to_the_same_samples(monkeypatch, caplog):
    """If torch.compile fails the same functions run eagerly: same theta and gradients
    (within float rounding of the vectorised maths), and a warning."""
    monkeypatch.setattr(counter, "ENABLED", True)
    torch.manual_seed(0)
    theta0, w0, a0 = torch.randn(900), torch.randn(900) * 0.1, torch.randn(900) * 2
    args = (theta0, w0, a0, torch.tensor(0.9), torch.tensor(0.2), torch.randn(900), 1.0,
            True, 8)
    compiled = _run_fused(*args)

    def broken(*_):
        raise RuntimeError("no C++ compiler")
    kernels = counter.Kernels(-1.5, 1.5, 1.0, True)
    kernels.compiled = [broken, broken]
    monkeypatch.setitem(counter._KERNELS, (-1.5, 1.5, 1.0, True), kernels)
    with caplog.at_level("WARNING", logger="diffprune.counter"):
        eager = _run_fused(*args)
    assert "torch.compile failed" in caplog.text and kernels.compiled == [None, None]
    for x, y in zip(compiled, eager):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()


def test_only_float32_cpu_tensors_use_the_kernels(monkeypatch):
    monkeypatch.setattr(counter, "ENABLED", True)
    x = torch.zeros(10)
    assert counter.usable(x, x, x)
    assert not counter.usable(x.double(), x.double(), x.double())
    assert not counter.usable(x.bfloat16(), x, x)
    monkeypatch.setattr(counter, "ENABLED", False)
    assert not counter.usable(x, x, x)


def _run_group(theta0s, ws0, as0, zg0, shift, upstreams, temperature, expected, seed):
    ws, as_ = ([t.clone().requires_grad_(True) for t in ts] for ts in (ws0, as0))
    zg = zg0.clone().requires_grad_(True)
    consts = (counter.kernels(-1.5, 1.5, temperature, expected),
              _i32(gates.CpuNoise(seed).seed32()), counter.scalar(shift), None)
    thetas = counter.GatedGroup.apply(consts, *theta0s, *ws, *as_, zg)
    sum((t * u).sum() for t, u in zip(thetas, upstreams)).backward()
    return ([t.detach() for t in thetas], [w.grad for w in ws], [a.grad for a in as_], zg.grad)


def _run_group_plain(theta0s, ws0, as0, zg0, shift, upstreams, temperature, expected, seed):
    """Each tensor through the plain formulation with its part of the group's noise: the
    tensors end to end, positions counted from the first."""
    total = sum(t.numel() for t in theta0s)
    u = counter.uniform(counter.positions(total, _i32(0)), _i32(gates.CpuNoise(seed).seed32()))
    ws, as_ = ([t.clone().requires_grad_(True) for t in ts] for ts in (ws0, as0))
    zg = zg0.clone().requires_grad_(True)
    thetas, start = [], 0
    for i, (theta0, w, a) in enumerate(zip(theta0s, ws, as_)):
        ui = u[start:start + a.numel()].view(a.shape)
        start += a.numel()
        thetas.append(theta0 + _plain_gate(a, shift, ui, temperature, expected) * zg[i] * w)
    sum((t * up).sum() for t, up in zip(thetas, upstreams)).backward()
    return ([t.detach() for t in thetas], [w.grad for w in ws], [a.grad for a in as_], zg.grad)


@pytest.mark.parametrize("expected", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2 / 3])
def test_small_tensors_gated_together_match_autograd(temperature, expected):
    """counter.GatedGroup (three tensors of different shapes in one pass) gives each theta
    and every gradient, the group gates' included, of the plain formulation within 1e-6
    (absolute) / 1e-5 (relative)."""
    torch.manual_seed(0)
    shapes = [(40, 7), (300,), (6, 5, 4)]
    theta0s = [torch.randn(s) for s in shapes]
    ws = [torch.randn(s) * 0.1 for s in shapes]
    as_ = [torch.randn(s) * 2 for s in shapes]
    upstreams = [torch.randn(s) for s in shapes]
    args = (theta0s, ws, as_, torch.tensor([0.7, 1.0, 0.3]), torch.tensor(-0.4), upstreams,
            temperature, expected, 11)
    out, ref = _run_group(*args), _run_group_plain(*args)
    for xs, ys in zip(out[:3], ref[:3]):
        for x, y in zip(xs, ys):
            assert x.shape == y.shape
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()
    assert torch.allclose(out[3], ref[3], rtol=1e-5, atol=1e-6), (out[3] - ref[3]).abs().max()
    z = (out[0][1] - theta0s[1]) / ws[1]  # its group gate is 1
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


def test_a_model_gates_its_small_tensors_in_one_pass(monkeypatch):
    """A sampled L0 forward sends every tensor under counter.SMALL entries through one
    GatedGroup call and the others through GatedDelta, one each."""
    import diffprune as dp
    from conftest import tiny_bert
    monkeypatch.setattr(counter, "ENABLED", True)
    monkeypatch.setattr(counter, "SMALL", 100)  # the tiny model's biases and norms
    model = tiny_bert()
    dp.prepare_(model, dp.DiffPruneConfig(structured=True))
    state = dp.get_state(model)
    state.seed_noise(0)
    calls = {"group": [], "single": 0}
    group_apply, single_apply = counter.GatedGroup.apply, GatedDelta.apply

    def group(consts, *tensors):
        calls["group"].append(len(tensors) // 3)
        return group_apply(consts, *tensors)

    def single(*args):
        calls["single"] += 1
        return single_apply(*args)
    monkeypatch.setattr(counter.GatedGroup, "apply", group)
    monkeypatch.setattr(GatedDelta, "apply", single)
    thetas = state.thetas(stochastic=True)
    small = sum(1 for w in state.w if w.numel() < 100)
    assert small > 1 and calls["group"] == [small]
    assert calls["single"] == len(state.w) - small == len(thetas) - small
