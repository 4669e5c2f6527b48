"""The fused gate (fused.GatedDelta) equals the plain autograd formulation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffprune import counter, fused, gates
from diffprune.fused import GatedDelta


@pytest.fixture
def stream(monkeypatch):
    """The numpy stream (gates.CpuNoise) instead of counter.py's kernels on CPU."""
    monkeypatch.setattr(counter, "ENABLED", False)


@pytest.mark.parametrize("chunk", [None, 500])
@pytest.mark.parametrize("temperature", [1.0, 2 / 3])
@pytest.mark.parametrize("stochastic", [True, False])
def test_fused_gate_matches_autograd(temperature, stochastic, chunk, monkeypatch):
    """Global RNG (no generator given), one chunk or five: same theta and gradients."""
    if chunk is not None:
        monkeypatch.setattr(fused, "CHUNK", chunk)
    torch.manual_seed(0)
    theta0 = torch.randn(64, 33)
    w0, a0 = torch.randn(64, 33) * 0.1, torch.randn(64, 33) * 2
    zg0, shift = torch.tensor(0.7), torch.tensor(-0.4)  # shift: the controller's offset
    upstream = torch.randn(64, 33)

    def run(use_fused: bool):
        w, a, zg = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
        torch.manual_seed(1)
        if use_fused:
            theta = GatedDelta.apply(theta0, w, a, shift, zg, -1.5, 1.5, temperature,
                                     stochastic)
        else:
            if stochastic:
                u = torch.cat([torch.rand(sp.stop - sp.start)
                               for sp in fused._spans(a.numel(), fused.CHUNK)]).view(a.shape)
                z = gates.sample_gate(a + shift, u=u, temperature=temperature)
            else:
                z = gates.deterministic_gate(a + shift)
            theta = theta0 + z * zg * w
        (theta * upstream).sum().backward()
        return theta, w.grad, a.grad, zg.grad

    plain, out = run(False), run(True)
    for x, y in zip(plain, out):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()
    assert (out[2] != 0).any() and (out[2] == 0).any()  # clamped entries get no gradient


def test_expected_gate_gradient_reaches_clamped_gates():
    torch.manual_seed(0)
    theta0, w = torch.randn(500), torch.randn(500)
    a = torch.full((500,), -6.0, requires_grad=True)  # almost surely closed
    torch.manual_seed(1)
    sampled = GatedDelta.apply(theta0, w, a, torch.tensor(0.0), torch.tensor(1.0), -1.5, 1.5, 1.0, True, False)
    sampled.sum().backward()
    assert (a.grad == 0).float().mean() > 0.95  # the paper's gradient: almost all zero
    b = a.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    expected = GatedDelta.apply(theta0, w, b, torch.tensor(0.0), torch.tensor(1.0), -1.5, 1.5, 1.0, True, True)
    expected.sum().backward()
    assert torch.equal(sampled, expected)  # same forward
    p = torch.sigmoid(torch.tensor(-6.0))
    assert torch.allclose(b.grad, w * p * (1 - p))  # g * w * sigma'(a - c), g = 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("chunk", [None, 16, 100])
@pytest.mark.parametrize("expected_grad", [False, True])
def test_recomputed_noise_matches_stored_gate(expected_grad, chunk, device, monkeypatch):
    """With a generator, backward draws the forward's noise again instead of keeping z,
    chunk by chunk (280 entries: one chunk, or 18 / 3 of them): the gradients equal those of
    the plain formulation with the same noise (a CUDA generator too, where there is a GPU)."""
    if chunk is not None:  # the chunk of the device's kind
        monkeypatch.setattr(fused, "CHUNK" if device == "cpu" else "GPU_CHUNK", chunk)
    torch.manual_seed(0)
    theta0, w0, a0 = (x.to(device) for x in (torch.randn(40, 7), torch.randn(40, 7) * 0.1,
                                              torch.randn(40, 7) * 2))
    zg0, upstream = torch.tensor(0.6, device=device), torch.randn(40, 7).to(device)
    w, a, zg = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
    gen = torch.Generator(device).manual_seed(5)
    shift = torch.tensor(0.25, device=device)
    theta = GatedDelta.apply(theta0, w, a, shift, zg, -1.5, 1.5, 1.0, True, expected_grad, gen)
    torch.rand(3, generator=gen, device=device)  # the generator moves on before backward
    (theta * upstream).sum().backward()
    ref_gen = torch.Generator(device).manual_seed(5)
    u = torch.cat([torch.rand(sp.stop - sp.start, generator=ref_gen, device=device)
                   for sp in fused._spans(280, fused.chunk_for(torch.device(device)))]
                  ).view(40, 7)
    w2, a2, zg2 = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
    z = gates.sample_gate(a2 + shift, u=u)
    ref = theta0 + z * zg2 * w2
    if expected_grad:  # the surrogate: d/da P(z != 0) in place of dz/da
        p = torch.sigmoid(a2 + shift)
        z = z.detach() + (p - p.detach())
        ref = theta0 + z * zg2 * w2
    (ref * upstream).sum().backward()
    assert torch.allclose(theta, ref, atol=1e-6)
    for x, y in ((w.grad, w2.grad), (a.grad, a2.grad), (zg.grad, zg2.grad)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()


@pytest.mark.parametrize("chunk", [None, 64])
def test_cpu_noise_is_replayed_in_backward(chunk, monkeypatch, stream):
    """gates.CpuNoise (numpy PCG64), the CPU default: backward replays the forward's noise
    from the saved state, span by span; gradients equal the plain formulation's with that
    noise, and the saved state restores the stream exactly."""
    if chunk is not None:
        monkeypatch.setattr(fused, "CHUNK", chunk)
    torch.manual_seed(0)
    theta0, w0, a0 = torch.randn(30, 11), torch.randn(30, 11) * 0.1, torch.randn(30, 11) * 2
    upstream = torch.randn(30, 11)
    noise = gates.CpuNoise(11)
    saved = noise.get_state()
    w, a, zg = w0.clone().requires_grad_(), a0.clone().requires_grad_(), torch.tensor(0.8,
                                                                                    requires_grad=True)
    theta = GatedDelta.apply(theta0, w, a, torch.tensor(0.0), zg, -1.5, 1.5, 1.0, True, False,
                             noise)
    noise.uniform((5,), torch.float32)  # the stream moves on before backward
    (theta * upstream).sum().backward()
    again = gates.CpuNoise(0).set_state(saved)
    u = torch.cat([again.uniform((sp.stop - sp.start,), torch.float32)
                   for sp in fused._spans(330, fused.CHUNK)]).view(30, 11)
    w2, a2, zg2 = w0.clone().requires_grad_(), a0.clone().requires_grad_(), torch.tensor(
        0.8, requires_grad=True)
    ref = theta0 + gates.sample_gate(a2, u=u) * zg2 * w2
    (ref * upstream).sum().backward()
    assert torch.allclose(theta, ref, atol=1e-6)
    for x, y in ((w.grad, w2.grad), (a.grad, a2.grad), (zg.grad, zg2.grad)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()
    with pytest.raises(ValueError, match="CpuNoise"):
        gates.CpuNoise().set_state(torch.Generator().get_state())  # a torch generator's state


@pytest.mark.parametrize("temperature", [1.0, 2 / 3])
def test_cpu_noise_skips_gates_the_noise_cannot_change(temperature, monkeypatch, stream):
    """Gates with logits far outside the band are 0 or 1 whatever the noise: no number is
    drawn for them, and the sample (theta, gradients) equals the plain formulation's with
    the drawn numbers at the uncertain entries in order (any u elsewhere)."""
    monkeypatch.setattr(fused, "CHUNK", 100)
    torch.manual_seed(0)
    n = 600
    a0 = torch.randn(n) * 2
    far = torch.rand(n) < 0.9
    far[100:200] = False  # a span of uncertain gates only: numbers drawn for all of it
    far[:100] = True  # a span without a single draw
    a0[far] = torch.where(torch.rand(int(far.sum())) < 0.5, -40.0, 40.0)
    lo, hi = fused._certain_band(-1.5, 1.5, temperature)
    assert -40 < lo < -13 and 14 < hi < 40
    theta0, w0, upstream = torch.randn(n), torch.randn(n) * 0.1, torch.randn(n)
    noise = gates.CpuNoise(3)
    saved = noise.get_state()
    w, a = w0.clone().requires_grad_(), a0.clone().requires_grad_()
    zg = torch.tensor(0.9, requires_grad=True)
    theta = GatedDelta.apply(theta0, w, a, torch.tensor(0.0), zg, -1.5, 1.5, temperature,
                             True, False, noise)
    (theta * upstream).sum().backward()
    again = gates.CpuNoise().set_state(saved)
    unsure = ~far
    u = torch.rand(n)  # the skipped gates ignore their noise
    for sp in fused._spans(n, 100):
        k = int(unsure[sp].sum())
        if k > fused._DENSE_FRACTION * 100:
            u[sp] = again.uniform((100,), torch.float32)
        elif k:
            u[sp][unsure[sp]] = again.uniform((k,), torch.float32)
    assert 0 < int(unsure[200:].sum()) < 0.25 * 400
    assert noise.get_state().tolist() == again.get_state().tolist()  # as many draws
    w2, a2 = w0.clone().requires_grad_(), a0.clone().requires_grad_()
    zg2 = torch.tensor(0.9, requires_grad=True)
    z = gates.sample_gate(a2, u=u, temperature=temperature)
    assert set(z[~unsure].tolist()) == {0.0, 1.0}
    ref = theta0 + z * zg2 * w2
    (ref * upstream).sum().backward()
    assert torch.allclose(theta, ref, atol=1e-6)
    for x, y in ((w.grad, w2.grad), (a.grad, a2.grad), (zg.grad, zg2.grad)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()


@pytest.mark.parametrize("expected_grad", [False, True])
def test_cpu_noise_keeps_mostly_clamped_spans_of_z(expected_grad, monkeypatch, stream):
    """Spans where most of z is 0 or most is 1 (fresh gates, or gates shut by the
    controller) are kept as fill value + exceptions instead of being redrawn in backward;
    a mixed span is redrawn. Either way theta and the gradients equal the plain
    formulation's with the same noise, and the mostly-clamped spans draw nothing in backward."""
    monkeypatch.setattr(fused, "CHUNK", 100)
    torch.manual_seed(0)
    n = 600
    a0 = torch.cat([5 + 0.3 * torch.randn(200),  # mostly 1: two spans with fill 1
                    torch.full((200,), -6.0),  # mostly 0: two spans with fill 0 ...
                    torch.randn(200) * 0.5])  # mixed: replayed
    a0[[210, 250, 333]] = 40.0  # ... with a few gates open for sure
    theta0, w0, upstream = torch.randn(n), torch.randn(n) * 0.1, torch.randn(n)
    kept, replays = [], []
    real_of = fused._SparseZ.of
    monkeypatch.setattr(fused._SparseZ, "of", staticmethod(
        lambda z: kept.append(real_of(z)) or kept[-1]))
    noise = gates.CpuNoise(4)
    saved = noise.get_state()
    w, a = w0.clone().requires_grad_(), a0.clone().requires_grad_()
    zg = torch.tensor(0.9, requires_grad=True)
    theta = GatedDelta.apply(theta0, w, a, torch.tensor(0.0), zg, -1.5, 1.5, 1.0, True,
                             expected_grad, noise)
    real_set_state = gates.CpuNoise.set_state
    monkeypatch.setattr(gates.CpuNoise, "set_state",
                        lambda self, s: replays.append(1) or real_set_state(self, s))
    (theta * upstream).sum().backward()
    assert [k is not None for k in kept] == [True] * 4 + [False] * 2
    assert [k.fill for k in kept[:4]] == [1.0, 1.0, 0.0, 0.0]
    assert all(0 < len(k.idx) <= fused._KEEP_FRACTION * 100 for k in kept[:4])
    assert len(replays) == 2  # only the mixed spans drew their noise again
    again = real_set_state(gates.CpuNoise(), saved)
    u = torch.cat([again.uniform((100,), torch.float32) for _ in range(6)])
    w2, a2 = w0.clone().requires_grad_(), a0.clone().requires_grad_()
    zg2 = torch.tensor(0.9, requires_grad=True)
    z = gates.sample_gate(a2, u=u)
    if expected_grad:  # the surrogate: d/da P(z != 0) in place of dz/da
        p = torch.sigmoid(a2)
        z = z.detach() + (p - p.detach())
    ref = theta0 + z * zg2 * w2
    (ref * upstream).sum().backward()
    assert torch.equal(theta, ref.detach()) or torch.allclose(theta, ref, atol=1e-6)
    for x, y in ((w.grad, w2.grad), (a.grad, a2.grad), (zg.grad, zg2.grad)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()


def test_kept_z_and_replayed_noise_give_identical_steps(monkeypatch, stream):
    """fused.KEEP_Z (bench/gate_cost.py's switch) changes the cost, never the result: theta
    and every gradient are bit-identical with z kept and with the noise replayed."""
    monkeypatch.setattr(fused, "CHUNK", 100)
    torch.manual_seed(0)
    a0 = torch.cat([torch.full((300,), 5.0), torch.full((200,), -5.3), torch.zeros(100)])
    theta0, w0, upstream = torch.randn(600), torch.randn(600) * 0.1, torch.randn(600)

    def run(keep: bool):
        monkeypatch.setattr(fused, "KEEP_Z", keep)
        w, a = w0.clone().requires_grad_(), a0.clone().requires_grad_()
        zg = torch.tensor(0.8, requires_grad=True)
        theta = GatedDelta.apply(theta0, w, a, torch.tensor(0.0), zg, -1.5, 1.5, 1.0, True,
                                 True, gates.CpuNoise(9))
        (theta * upstream).sum().backward()
        return theta, w.grad, a.grad, zg.grad

    for x, y in zip(run(True), run(False)):
        assert torch.equal(x, y)


def test_gate_cost_bench_writes_its_table(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gate_cost.py"
    subprocess.run([sys.executable, str(script), "--n", "3000", "--steps", "1", "--out",
                    str(tmp_path)], check=True, capture_output=True)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 5  # header and the four gate states
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert all(r[f"{v}_ms"] > 0 for r in rows
               for v in ("counter", "stream_kept", "stream_replayed"))
