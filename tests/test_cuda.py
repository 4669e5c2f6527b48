"""The GPU path: the fused gate with a CUDA generator and training under bf16 autocast.
Skipped where no GPU is present (CI has none; bench/README.md says where these ran)."""
import json

import pytest
import torch

import diffprune as dp
from diffprune import fused, gates
from diffprune.cli import main
from diffprune.fused import GatedDelta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("expected_grad", [False, True])
def test_fused_gate_on_the_gpu_matches_the_plain_formula(expected_grad, chunk, monkeypatch):
    """A CUDA generator is replayed in backward (one chunk, or 18 of 64 entries): theta
    and the gradients equal those of the plain formulation with the same noise."""
    if chunk is not None:
        monkeypatch.setattr(fused, "GPU_CHUNK", chunk)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    theta0, w0, a0 = (torch.randn(40, 29, device=dev) * s for s in (1.0, 0.1, 2.0))
    zg0, upstream = torch.tensor(0.6, device=dev), torch.randn(40, 29, device=dev)
    shift = torch.tensor(0.25, device=dev)
    w, a, zg = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
    gen = torch.Generator(dev).manual_seed(5)
    theta = GatedDelta.apply(theta0, w, a, shift, zg, -1.5, 1.5, 2 / 3, True, expected_grad,
                             gen)
    torch.rand(3, generator=gen, device=dev)  # the generator moves on before backward
    (theta * upstream).sum().backward()
    ref_gen = torch.Generator(dev).manual_seed(5)
    u = torch.cat([torch.rand(sp.stop - sp.start, generator=ref_gen, device=dev)
                   for sp in fused._spans(a0.numel(), fused.chunk_for(dev))]).view(a0.shape)
    w2, a2, zg2 = (t.clone().requires_grad_(True) for t in (w0, a0, zg0))
    z = gates.sample_gate(a2 + shift, u=u, temperature=2 / 3)
    if expected_grad:  # the surrogate: d/da P(z != 0) in place of dz/da
        p = torch.sigmoid(a2 + shift)  # log(-l / r) = 0 for l = -1.5, r = 1.5
        z = z.detach() + (p - p.detach())
    ref = theta0 + z * zg2 * w2
    (ref * upstream).sum().backward()
    assert torch.allclose(theta, ref, atol=1e-6)
    for x, y in ((w.grad, w2.grad), (a.grad, a2.grad), (zg.grad, zg2.grad)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (x - y).abs().max()


def test_training_on_the_gpu_gives_a_diff_that_scores_the_same_on_the_cpu(
        tmp_path, tiny_model_dir, tiny_glue, capsys):
    """Diff pruning on CUDA under bf16 autocast (precision auto), both phases: exactly k
    nonzeros, and the saved diff applied on the CPU scores what the trainer measured."""
    out = tmp_path / "run"
    assert main(["-q", "train", "--task", "sst2", "--data-dir", str(tiny_glue), "--model",
                 str(tiny_model_dir), "--out", str(out), "--epochs", "2", "--fixmask-epochs",
                 "1", "--batch-size", "8", "--density", "0.05", "--lr", "1e-2",
                 "--lr-fixmask", "1e-2", "--device", "cuda"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["nnz"] == round(0.05 * results["gated_params"])
    assert results["peak_memory_bytes"] > 0 and results["config"]["device"] == "cuda"
    diff = dp.SparseDiff.load(out / "diff")
    assert sum(int(t.values.ne(0).sum()) for t in diff.tensors) > 0
    capsys.readouterr()
    assert main(["-q", "eval", str(out / "diff"), "--data-dir", str(tiny_glue)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(results["score"],
                                                                         abs=1e-9)
