import math

import torch

from diffprune import gates


def test_sample_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    log_alpha = torch.linspace(-3, 3, 20000)
    z = gates.sample_gate(log_alpha)
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()
    assert ((z > 0) & (z < 1)).any()


def test_extreme_log_alpha_and_u_at_bounds_are_finite():
    log_alpha = torch.tensor([-20.0, -20.0, 20.0, 20.0, 0.0, 0.0], requires_grad=True)
    u = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    z = gates.sample_gate(log_alpha, u=u)
    p = gates.prob_nonzero(log_alpha)
    (z.sum() + p.sum()).backward()
    for t in (z, p, log_alpha.grad, gates.deterministic_gate(log_alpha)):
        assert torch.isfinite(t).all()
    assert z[0] == 0 and z[3] == 1  # u=0 with very negative log_alpha closes, u=1 opens


def test_expected_l0_matches_monte_carlo():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.5])
    for temperature, left, right in [(1.0, -1.5, 1.5), (2 / 3, -0.1, 1.1)]:
        draws = gates.sample_gate(log_alpha.expand(200000, 5), left=left, right=right,
                                  temperature=temperature)
        mc = (draws > 0).float().mean(0)
        closed = gates.prob_nonzero(log_alpha, left, right, temperature)
        assert torch.allclose(mc, closed, atol=5e-3), (mc, closed)


def test_deterministic_gate_values():
    z = gates.deterministic_gate(torch.tensor([5.0, -5.0, 0.0]))
    assert z[0] == 1 and z[1] == 0
    assert math.isclose(float(z[2]), 0.0, abs_tol=1e-7)  # sigmoid(0)*3 - 1.5 = 0
