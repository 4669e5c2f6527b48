"""bench/compare.py: runs in parallel start task-seed by task-seed; a stopped harness stops
starting runs and still reports the finished ones."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
compare = importlib.util.module_from_spec(spec)
sys.modules["bench_compare"] = compare  # its dataclasses look their module up there
spec.loader.exec_module(compare)


def test_parallel_runs_start_with_every_method_of_a_task_seed_together():
    todo = [(m, t, s) for m in ("full", "diff-s-0.005") for t in ("rte", "mrpc")
            for s in (1, 2)]  # method-major, as compare.py builds it
    started = [todo[i] for i in compare.start_order(todo)]
    assert started == [("full", "rte", 1), ("diff-s-0.005", "rte", 1),
                       ("full", "mrpc", 1), ("diff-s-0.005", "mrpc", 1),
                       ("full", "rte", 2), ("diff-s-0.005", "rte", 2),
                       ("full", "mrpc", 2), ("diff-s-0.005", "mrpc", 2)]


def test_a_run_that_fails_or_is_interrupted_starts_no_other(monkeypatch):
    import threading
    import time
    import types

    started, lock = [], threading.Lock()

    def run_one(out, variant, task, seed, profile, args):
        with lock:
            started.append((variant, task, seed))
            second = len(started) == 2
        if second:  # as a run stopped by a time limit's SIGINT ends, while the first runs on
            raise SystemExit("run failed (exit 1); rerun to resume")
        time.sleep(0.3)
        return {"score": 1.0}
    monkeypatch.setattr(compare, "run_one", run_one)
    todo = [(m, t, s) for m in ("full", "diff-s-0.005") for t in ("rte", "mrpc", "stsb", "cola")
            for s in (1,)]
    with pytest.raises(SystemExit):
        compare.run_all(Path("unused"), todo, None, types.SimpleNamespace(jobs=2))
    # the run beside the failed one finishes; the pool starts at most one more, not all 8
    # (nor the runs that start while the first is awaited)
    assert 2 <= len(started) <= 3


def test_a_stopped_harness_reports_the_runs_that_finished(monkeypatch, tmp_path):
    def run_all(out, todo, profile, args):  # one run finishes, then a time limit's SIGINT
        run = compare.run_path(out, *todo[0])
        run.parent.mkdir(parents=True)
        run.write_text(json.dumps({"score": 1.0}))
        raise KeyboardInterrupt
    reported = []
    monkeypatch.setattr(compare, "run_all", run_all)
    monkeypatch.setattr(compare, "write_results",
                        lambda out, records, *rest: reported.append((records, rest[-1])))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--profile", "smoke", "--out", str(tmp_path)])
    import signal
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        compare.main()
    # main gives the caller its signal handlers back
    assert {sig: signal.getsignal(sig) for sig in before} == before
    # the report lists the command, so that it says how the runs were trained and resumed
    assert reported == [([{"score": 1.0}],
                         f"python bench/compare.py --profile smoke --out {tmp_path}")]


def test_a_finished_run_trained_otherwise_stops_the_harness_before_it_trains(monkeypatch,
                                                                           tmp_path):
    import types
    profile = compare.PROFILES["smoke"]
    asked = types.SimpleNamespace(model="tiny", data_dir="glue", overrides={})
    run = compare.run_path(tmp_path, "full", "sst2", 1)
    run.parent.mkdir(parents=True)
    trained = []
    monkeypatch.setattr(compare, "run_all", lambda out, todo, *rest: trained.append(todo) or [])
    monkeypatch.setattr(compare, "write_results", lambda *a, **k: None)
    argv = ["compare.py", "--profile", "smoke", "--model", "tiny", "--data-dir", "glue",
            "--methods", "full", "--seeds", "1", "--out", str(tmp_path)]

    def finished_with(**changed):
        cfg = {**compare.run_config(tmp_path, "full", "sst2", 1, profile, asked), **changed}
        run.write_text(json.dumps({"score": 1.0, "config": cfg}))

    # trained as this command asks (the data may lie elsewhere now): kept, and reported
    finished_with(data_dir="/elsewhere/glue")
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    assert trained == [[("full", "sst2", 1)]]
    # trained at another rate (an older default, or another --set): named, nothing trains
    finished_with(lr_full=3e-5)
    with pytest.raises(SystemExit, match=r"sst2-full-s1\.json was trained with other settings: "
                                         r"lr_full 3e-05 \(asked 5e-05\)"):
        compare.main()
    assert len(trained) == 1
    # --set that rate asks for what was trained
    monkeypatch.setattr(sys, "argv", argv + ["--set", "lr_full=3e-5"])
    compare.main()
    assert len(trained) == 2
    # a record that cannot say how it was trained is named too
    run.write_text(json.dumps({"score": 1.0}))
    with pytest.raises(SystemExit, match=r"sst2-full-s1\.json is not a run record"):
        compare.main()
    finished_with(lr_full=3e-5)
    # a run this command does not ask for is only reported, whatever its settings
    monkeypatch.setattr(sys, "argv", [a if a != "full" else "bitfit" for a in argv])
    compare.main()
    assert len(trained) == 3


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_runs_at_a_checkpoint_and_records_the_command(tiny_model_dir, tiny_glue,
                                                                    tmp_path, jobs):
    """A SIGTERM sent to the harness alone (kill PID) reaches the run in progress, which
    stops at a checkpoint instead of being killed, and the report lists the command."""
    import os
    import signal
    import subprocess
    out = tmp_path / "compare"
    cmd = [sys.executable, str(ROOT / "bench" / "compare.py"), "--profile", "smoke",
           "--model", str(tiny_model_dir), "--data-dir", str(tiny_glue), "--out", str(out)]
    subprocess.run(cmd + ["--methods", "bitfit"], check=True, capture_output=True)
    long = ["--methods", "full", "--jobs", str(jobs), "--set", "epochs=1000"]
    run_dir = out / "tmp" / "sst2-full-s1"
    log = tmp_path / "stderr.txt"  # a file, not a pipe: an unread pipe fills and blocks
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd + long, stdout=subprocess.DEVNULL, stderr=fh,
                                start_new_session=True)  # its runs share its group
    try:
        _stop_while_a_run_trains(proc, run_dir / "metrics.jsonl")
        # no process of the harness outlives it (before, its runs went on training)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
    finally:  # nothing left behind if the test fails
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    # the run was told to stop and wrote its checkpoint (a killed run prints nothing)
    assert "stopped after step" in err and (run_dir / "checkpoint").is_dir()
    assert not compare.run_path(out, "full", "sst2", 1).exists()
    # the report has the finished run and both commands, the stopped one last
    commands = json.loads((out / "results.json").read_text())["commands"]
    assert len(commands) == 2 and commands[-1].endswith(
        f"--methods full --set epochs=1000 --out {out}")
    assert "| BitFit" in (out / "results.md").read_text()
    # a run's record keeps its learning curve: one phase here, whose best epoch is the score
    bitfit = json.loads(compare.run_path(out, "bitfit", "sst2", 1).read_text())
    assert len({e["phase"] for e in bitfit["epochs"]}) == 1
    assert max(e["score"] for e in bitfit["epochs"]) == bitfit["score"]


def _stop_while_a_run_trains(proc, metrics: Path) -> None:
    """SIGTERM to the harness ``proc`` alone once its run has logged its first metrics
    line (it is training: on the tiny data, the first epoch's evaluation)."""
    import signal
    import time
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run logged no metrics in 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to the harness only, not to its run
    proc.wait(timeout=120)
