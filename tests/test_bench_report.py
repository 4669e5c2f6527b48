"""bench/report.py marks rows trained with an earlier default of a setting their method uses."""
import importlib.util
from pathlib import Path

import pytest

from diffprune.recipe import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)
NOW = TrainConfig()


def record(variant, method, task, score, **cfg):
    config = {"method": method, "lr": NOW.lr, "lr_fixmask": NOW.lr_fixmask,
              "lr_head": NOW.lr_head, **cfg}
    return {"variant": variant, "task": task, "seed": 1, "score": score, "nnz": 10,
            "total_params": 1010, "dense_params": 10, "stored_params": 20, "trainable_params": 30,
            "artifact_bytes": 100, "position_bits_per_nnz": 8.0, "wall_time_s": 1.0,
            "peak_memory_bytes": 2**20, "config": config}


def test_only_settings_the_method_uses_are_compared_with_todays_defaults():
    old = NOW.lr_fixmask / 5
    assert report.earlier_defaults([record("diff-s-0.005", "diff", "a", 1, lr_fixmask=old)]) \
        == {"lr_fixmask": {"values": [old], "now": NOW.lr_fixmask}}
    # full finetuning has no fixed-mask phase: its recorded lr_fixmask does not matter
    assert report.earlier_defaults([record("full", "full", "a", 1, lr_fixmask=old)]) == {}
    assert report.earlier_defaults([record("full", "full", "a", 1, lr_head=1.0)]) == \
        {"lr_head": {"values": [1.0], "now": NOW.lr_head}}
    assert report.earlier_defaults([record("diff-s-0.005", "diff", "a", 1)]) == {}
    # the fixed-mask rate's default depends on the density: 1e-3 at 0.5%, 3e-3 at 0.1%
    assert report.earlier_defaults([record("diff-s-0.001", "diff", "a", 1, density=0.001,
                                           lr_fixmask=3e-3)]) == {}
    assert report.earlier_defaults([record("diff-s-0.001", "diff", "a", 1, density=0.001,
                                           lr_fixmask=1e-3)]) == \
        {"lr_fixmask": {"values": [1e-3], "now": 3e-3}}

    # a run is judged by the defaults of its variant's method (BitFit's own head rate)
    bitfit = {"method": "bitfit", "epochs": 4}  # what compare.variant_config gives
    assert report.earlier_defaults([record("bitfit", "bitfit", "a", 1, lr_head=1e-3)],
                                   bitfit) == {}
    assert report.earlier_defaults([record("bitfit", "bitfit", "a", 1)], bitfit) == \
        {"lr_head": {"values": [NOW.lr_head], "now": 1e-3}}


def test_table_marks_the_stale_row_and_says_why():
    old = NOW.lr_fixmask / 5
    records = [record("full", "full", "a", 80.0, lr_fixmask=old),
               record("diff-s-0.005", "diff", "a", 70.0, lr_fixmask=old),
               record("diff-s-0.001", "diff", "a", 60.0)]
    lines = report.tables(report.aggregate(records, ("a",)), ("a",), 4000)
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert "diff pruning, structured 0.5% †" in rows
    assert "diff pruning, structured 0.1%" in rows and "full finetuning" in rows
    notes = [line for line in lines if line.startswith("†")]
    assert notes == [f"† trained with an earlier default, not retrained since: diff pruning, "
                     f"structured 0.5%: lr_fixmask {old} (now {NOW.lr_fixmask})."]


def test_a_command_run_again_moves_to_the_end_and_report_only_adds_nothing():
    a, b, c = "compare --methods a", "compare --methods b", "compare --methods c"
    assert report.with_command([a, b, c], a) == [b, c, a]
    assert report.with_command([a, b], c) == [a, b, c]
    assert report.with_command([a, b], None) == [a, b]


def test_methods_are_paired_on_the_seeds_both_finished_every_task_of():
    tasks = ("a", "b")
    scores = {("full", 1): (80, 60), ("full", 2): (82, 62), ("diff-s-0.005", 1): (81, 59),
              ("diff-s-0.005", 2): (80, 62), ("lora", 1): (79, 60), ("lora", 3): (90, 90),
              ("bitfit", 2): (70, 50), ("magnitude", 2): (80, 62),
              ("magnitude-0.001", 1): (80, 60), ("diff-u-0.005", 1): (82, 60)}
    records = [{**record(v, v.split("-")[0], t, sc), "seed": seed}
               for (v, seed), pair in scores.items() for t, sc in zip(tasks, pair)]
    # lora seed 2 is missing a task: not a shared seed
    records.append({**record("lora", "lora", "a", 99), "seed": 2})
    p = report.paired(records, tasks, "diff-s-0.005", "full")
    assert p["seeds"] == [1, 2] and p["per_seed"] == [0.0, -1.0] and p["mean"] == -0.5
    # two seeds: t(0.975, 1 df) = 12.706, sd 0.7071, so -0.5 +- 12.706 * 0.5
    assert p["interval95"] == pytest.approx([-0.5 - 6.353, -0.5 + 6.353], abs=1e-3)
    assert (p["better"], p["same"], p["worse"]) == (1, 1, 2)
    p = report.paired(records, tasks, "diff-s-0.005", "lora")
    assert p["seeds"] == [1] and p["per_seed"] == [0.5] and (p["better"], p["worse"]) == (1, 1)
    assert p["interval95"] is None
    assert report.paired(records, tasks, "bitfit", "lora") is None
    # other methods are paired with full finetuning only; diff pruning also with the peers
    # and with the magnitude mask at its own density; unstructured also with structured
    variants = ["full", "diff-s-0.005", "lora", "bitfit", "magnitude", "magnitude-0.001",
                "diff-u-0.005"]
    got = {(a, b) for a, b, _ in report.pairings(records, tasks, variants)}
    assert got == {("diff-s-0.005", "full"), ("diff-s-0.005", "lora"), ("lora", "full"),
                   ("bitfit", "full"), ("diff-s-0.005", "magnitude"), ("magnitude", "full"),
                   ("magnitude-0.001", "full"), ("diff-u-0.005", "full"),
                   ("diff-u-0.005", "lora"), ("diff-u-0.005", "diff-s-0.005")}
    lines = report.paired_table(records, tasks, ["full", "diff-s-0.005", "lora", "bitfit"])
    assert "| diff pruning, structured 0.5% | full finetuning | 1, 2 | +0.00, -1.00 | -0.50 " \
           "| -6.85 to +5.85 | 1 / 1 / 2 |" in lines
    assert "| diff pruning, structured 0.5% | LoRA (PEFT, ~0.5%) | 1 | +0.50 | +0.50 |  | " \
           "1 / 0 / 1 |" in lines


def test_plot_legend_names_the_seeds_behind_each_point(tmp_path):
    def seeded(variant, method, seed, task="a"):
        return {**record(variant, method, task, 50.0 + seed), "seed": seed}
    records = [seeded("full", "full", s) for s in (1, 2, 3)] \
        + [seeded("diff-s-0.005", "diff", s) for s in (1, 2, 3)] \
        + [{**seeded("diff-s-0.01", "diff", 1), "nnz": 20}, seeded("lora", "lora", 1),
           seeded("lora", "lora", 2), seeded("bitfit", "bitfit", 1, task="b")]
    rows = report.aggregate(records, ("a",))
    # BitFit has no score on task a, so no average and no point
    assert report.seed_counts(rows) == {"full": 3, "diff-s-0.005": 3, "diff-s-0.01": 1,
                                        "lora": 2}
    # a variant counts the seeds of its task with the fewest
    two = [seeded("full", "full", s, t) for s in (1, 2) for t in "ab"] \
        + [seeded("lora", "lora", 1, "a"), seeded("lora", "lora", 2, "a"),
           seeded("lora", "lora", 1, "b")]
    assert report.seed_counts(report.aggregate(two, ("a", "b"))) == {"full": 2, "lora": 1}
    assert report.with_seeds("LoRA", [1]) == "LoRA, 1 seed"
    assert report.with_seeds("LoRA", [5]) == "LoRA, 5 seeds"
    assert report.with_seeds("diff", [3, 3, 6, 1]) == "diff, 3/3/6/1 seeds"
    # the legend the plot draws, read back from the figure: a line's counts in order of % stored
    import matplotlib.pyplot as plt
    seen = {}
    real_savefig = plt.Figure.savefig
    def capture(fig, *args, **kw):
        seen["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real_savefig(fig, *args, **kw)
    plt.Figure.savefig = capture
    try:
        report.plot_scores(rows, tmp_path / "p.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "p.png").stat().st_size > 0
    assert seen["labels"] == ["diff pruning (structured), 3/1 seeds", "full finetuning, 3 seeds",
                              "LoRA (PEFT, ~0.5%), 2 seeds"]


def test_the_header_tells_the_training_sets_and_epochs_the_runs_used():
    from types import SimpleNamespace
    quick = SimpleNamespace(max_train_samples=1000, epochs=2, fixmask_epochs=2, single=4,
                            single_epochs=None)
    runs = [record("full", "full", "cola", 1, max_train_samples=None, epochs=4),
            record("diff-s-0.005", "diff", "cola", 1, max_train_samples=None, epochs=2,
                   fixmask_epochs=2)]
    text = report.training_text(runs, quick)  # --set max_train_samples=null
    assert text.startswith("full training sets;") and "1,000" not in text
    assert "2 + 2 epochs" in text and "same number of steps" in text
    split = [record("diff-s-0.005", "diff", "cola", 1, max_train_samples=1000, epochs=3,
                    fixmask_epochs=1)]
    text = report.training_text(split, quick)  # --set epochs=3 fixmask_epochs=1
    assert text.startswith("1,000 seeded training examples per task;")
    assert "3 + 1 epochs" in text and "2 + 2" not in text
    assert "1,000 seeded" in report.training_text([], quick)  # no runs: the profile's


def test_a_study_of_some_tasks_reports_their_columns_and_average():
    five = ("rte", "mrpc", "stsb", "cola", "sst2")
    runs = [record("full", "full", t, s) for t, s in (("cola", 30.0), ("rte", 60.0))]
    shown = report.reported_tasks(five, runs)  # --tasks cola rte: the profile's order
    assert shown == ("rte", "cola")
    assert report.aggregate(runs, shown)["full"]["average"] == 45.0
    assert report.aggregate(runs, five)["full"]["average"] is None  # what it was before
    assert report.reported_tasks(five, []) == five
    # the header says the average is over fewer tasks than the profile's
    assert "Only 2 of the profile's 5 tasks have runs here (rte, cola)" in \
        report.subset_text(shown, five)
    assert report.subset_text(five, five) == "" and report.subset_text(shown, None) == ""
