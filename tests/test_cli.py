"""The command line end to end on a tiny model and tiny data."""
import argparse
import json

import pytest
import torch
from conftest import write_tiny_model_dir
from transformers import AutoModelForSequenceClassification

import diffprune as dp
from diffprune.cli import _add_config_options, _config, main
from diffprune.errors import ConfigError
from diffprune.recipe import TrainConfig, default_lr_fixmask


def _train(tmp_path, model_dir, glue, *extra, name="run"):
    out = tmp_path / name
    args = ["-q", "train", "--task", "sst2", "--data-dir", str(glue), "--model",
            str(model_dir), "--out", str(out), "--epochs", "2", "--fixmask-epochs", "1",
            "--batch-size", "8", "--density", "0.05", "--lr", "1e-2", "--lr-fixmask", "1e-2",
            "--save-every", "2", *extra]
    return main(args), out


def test_train_eval_inspect_merge_predict(tmp_path, tiny_model_dir, tiny_glue, capsys):
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue)
    assert rc == 0
    results = json.loads((run / "results.json").read_text())
    assert results["nnz"] == round(0.05 * results["gated_params"])
    assert set(results["phases"]) == {"l0", "fixmask"}
    assert "dev" in results["projection"] and "dev" in results["phases"]["l0"]
    assert results["artifact_bytes"] == sum(p.stat().st_size for p in (run / "diff").iterdir())
    assert (run / "metrics.jsonl").read_text().count('"event": "eval"') == 3
    curve = results["epochs"]  # the dev score after every epoch, each once
    assert [(e["phase"], e["epoch"]) for e in curve] == [("l0", 0), ("l0", 1), ("fixmask", 0)]
    assert curve[-1]["score"] == results["score"]  # the one fixed-mask epoch is the best
    assert curve[1]["score"] == pytest.approx(results["phases"]["l0"]["dev"]["score"])
    capsys.readouterr()

    assert main(["-q", "eval", str(run / "diff"), "--data-dir", str(tiny_glue)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["score"] == pytest.approx(results["score"], abs=1e-9)

    png = tmp_path / "density.png"
    assert main(["-q", "inspect", str(run / "diff"), "--plot", str(png)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nnz"] == results["nnz"] and png.stat().st_size > 1000
    assert sum(v["nnz"] for v in info["per_component"].values()) == info["nnz"]
    assert sum(v["nnz"] for v in info["per_layer"].values()) == info["nnz"]

    merged = tmp_path / "merged"
    assert main(["-q", "merge", str(run / "diff"), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["-q", "predict", str(run / "diff"), "the film was great"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["label"] in {"0", "1"} and abs(sum(pred["scores"].values()) - 1) < 1e-3

    # the merged directory equals base + diff
    diff = dp.SparseDiff.load(run / "diff")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    diff.apply_(base.eval())
    reloaded = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    ids = torch.randint(5, 20, (3, 7))
    assert torch.allclose(base(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)


def test_training_steps_run_in_train_mode(tmp_path, tiny_model_dir, tiny_glue, monkeypatch):
    """from_pretrained returns an eval-mode model: the trainer must still train with dropout
    and sampled gates (stochastic thetas in the L0 phase), and evaluate deterministically."""
    from diffprune import parametrize
    seen, real = [], parametrize.DiffState.thetas
    monkeypatch.setattr(parametrize.DiffState, "thetas",
                        lambda self, stochastic=False, *a: seen.append((self.stage, stochastic))
                        or real(self, stochastic, *a))
    modes = []
    real_forward = torch.nn.Dropout.forward
    monkeypatch.setattr(torch.nn.Dropout, "forward",
                        lambda self, x: modes.append(self.training) or real_forward(self, x))
    rc, _ = _train(tmp_path, tiny_model_dir, tiny_glue, "--epochs", "1")
    assert rc == 0
    assert ("l0", True) in seen and ("l0", False) in seen  # training steps and evaluation
    assert True in modes and False in modes


@pytest.mark.parametrize("extra", [(), ("--dense-warmup", "0.3", "--gate-init", "magnitude")])
def test_resume_after_interruption_gives_identical_diff(tmp_path, tiny_model_dir, tiny_glue,
                                                        extra):
    rc, ref = _train(tmp_path, tiny_model_dir, tiny_glue, *extra, name="ref")
    assert rc == 0
    # stop twice: once inside the L0 phase (inside the dense warm-up when there is one: the
    # tiny data make 5 steps per epoch, so the warm-up is the first 3 of 10), once inside the
    # fixed-mask phase
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, *extra, "--stop-after-steps", "2",
                     name="cut")
    assert rc == 130 and not (run / "diff").exists()
    rc, _ = _train(tmp_path, tiny_model_dir, tiny_glue, *extra, "--resume",
                   "--stop-after-steps", "12", name="cut")
    assert rc == 130
    rc, _ = _train(tmp_path, tiny_model_dir, tiny_glue, *extra, "--resume", name="cut")
    assert rc == 0
    a, b = dp.SparseDiff.load(ref / "diff"), dp.SparseDiff.load(run / "diff")
    for x, y in zip(a.tensors, b.tensors):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.values, y.values), x.name
    for n in a.dense:
        assert torch.equal(a.dense[n], b.dense[n])
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (ref, run))
    assert ra["score"] == rb["score"] and ra["train_steps"] == rb["train_steps"]
    assert ra["epochs"] == rb["epochs"] and len(ra["epochs"]) == 3  # each epoch once


def test_a_stop_asked_for_while_the_final_files_are_written_waits_for_them(
        tmp_path, tiny_model_dir, tiny_glue, monkeypatch):
    import os
    import signal

    from diffprune.train import Trainer
    save = Trainer._save_artifact

    def interrupted(self):  # SIGINT (a harness's time limit) as the diff is written
        os.kill(os.getpid(), signal.SIGINT)
        return save(self)
    monkeypatch.setattr(Trainer, "_save_artifact", interrupted)
    before = signal.getsignal(signal.SIGINT)
    try:
        rc, run = _train(tmp_path, tiny_model_dir, tiny_glue)
    except KeyboardInterrupt:
        pytest.fail("the stop ended the run before it wrote its results")
    assert rc == 0 and (run / "results.json").exists()
    assert dp.SparseDiff.load(run / "diff").nnz == json.loads(
        (run / "results.json").read_text())["nnz"]
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler again


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model_dir, tiny_glue, capsys):
    _train(tmp_path, tiny_model_dir, tiny_glue, "--stop-after-steps", "2")
    rc, _ = _train(tmp_path, tiny_model_dir, tiny_glue, "--resume", "--density", "0.1")
    assert rc == 2 and "different settings (density)" in capsys.readouterr().err


def test_unstructured_flag(tmp_path, tiny_model_dir, tiny_glue):
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, "--unstructured", "--epochs", "1")
    assert rc == 0
    assert dp.SparseDiff.load(run / "diff").config.structured is False


@pytest.mark.parametrize("method", ["full", "magnitude", "bitfit", "random"])
def test_baseline_methods(tmp_path, tiny_model_dir, tiny_glue, method):
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, "--method", method)
    assert rc == 0
    results = json.loads((run / "results.json").read_text())
    if method in ("magnitude", "random"):
        assert results["nnz"] == round(0.05 * results["gated_params"])
    if method == "bitfit":
        diff = dp.SparseDiff.load(run / "diff")
        assert all(t.name.endswith(".bias") for t in diff.tensors)


def test_regression_task_and_custom_files(tmp_path, tiny_model_dir, tiny_glue, capsys):
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, "--task", "stsb", name="stsb")
    assert rc == 0
    res = json.loads((run / "results.json").read_text())
    assert {"pearson", "spearman"} <= set(res["dev"]["dev"])
    rows = [{"review": s, "stars": y} for s, y in [("good fun film", "pos"),
                                                   ("dull bad plot", "neg")] * 8]
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, "--task", "mine", "--train-file",
                     str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "dev.jsonl"),
                     "--text-column", "review", "--label-column", "stars", name="custom")
    assert rc == 0
    capsys.readouterr()
    assert main(["-q", "predict", str(run / "diff"), "good fun"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in {"neg", "pos"}


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_model_dir, tiny_glue, capsys):
    cases = [
        (["train", "--task", "nope", "--out", str(tmp_path / "x")], "unknown task 'nope'"),
        (["train", "--task", "sst2", "--density", "0", "--out", str(tmp_path / "x")],
         "density must be in (0, 1]"),
        (["train", "--task", "rte", "--data-dir", str(tiny_glue), "--model", str(tiny_model_dir),
          "--out", str(tmp_path / "x")], "has no RTE/ folder"),
        (["train", "--task", "sst2", "--train-file", str(tmp_path / "missing.csv"),
          "--dev-file", str(tmp_path / "missing.csv"), "--model", str(tiny_model_dir),
          "--out", str(tmp_path / "x")], "missing file"),
        (["inspect", str(tmp_path)], "is not a diff directory"),
    ]
    for args, message in cases:
        assert main(["-q", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    # a diff applied to another base model
    rc, run = _train(tmp_path, tiny_model_dir, tiny_glue, "--epochs", "1", name="d")
    other = write_tiny_model_dir(tmp_path / "other", seed=5)
    capsys.readouterr()
    assert main(["-q", "predict", str(run / "diff"), "good", "--base", str(other)]) == 2
    assert "base fingerprint mismatch" in capsys.readouterr().err


def test_density_dependent_defaults_unless_given():
    # the measured values at 0.5% and 0.1%, held beyond, interpolated between
    densities = (0.0002, 0.001, 0.0025, 0.005, 0.01)
    assert [default_lr_fixmask(d) for d in densities] == [3e-3, 3e-3, 2.38e-3, 2e-3, 2e-3]
    assert [TrainConfig(density=d).controller_warmup for d in densities] == \
        [1.0, 1.0, 0.715, 0.5, 0.5]
    assert TrainConfig(density=0.001, controller_warmup=0.3).controller_warmup == 0.3
    with pytest.raises(ConfigError, match="controller_warmup"):
        TrainConfig(controller_warmup=0.0)
    assert TrainConfig(density=0.001).lr_fixmask == 3e-3
    assert TrainConfig(density=0.001, lr_fixmask=5e-4).lr_fixmask == 5e-4
    parser = argparse.ArgumentParser()
    _add_config_options(parser)
    assert _config(parser.parse_args(["--density", "0.001"])).lr_fixmask == 3e-3
    assert _config(parser.parse_args(["--density", "0.001", "--lr-fixmask", "2e-3"])
                   ).lr_fixmask == 2e-3
    assert _config(parser.parse_args(["--density", "0.001"])).controller_warmup == 1.0
    assert _config(parser.parse_args(["--density", "0.001", "--controller-warmup", "0.6"])
                   ).controller_warmup == 0.6


def test_bitfit_trains_its_biases_and_head_at_its_own_rate_unless_given():
    assert (TrainConfig().lr_full, TrainConfig().lr_head) == (5e-5, 1e-4)
    assert (TrainConfig(method="bitfit").lr_full, TrainConfig(method="bitfit").lr_head) == \
        (1e-3, 1e-3)
    assert TrainConfig(method="bitfit", lr_full=5e-4).lr_head == 5e-4
    parser = argparse.ArgumentParser()
    _add_config_options(parser)
    got = _config(parser.parse_args(["--method", "bitfit", "--lr-head", "2e-4"]))
    assert (got.lr_full, got.lr_head) == (1e-3, 2e-4)
