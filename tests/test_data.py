import numpy as np
import pytest

from diffprune.data import DataError, get_task, load_files, load_task
from diffprune.data.loaders import read_glue_tsv
from diffprune.data.metrics import compute, f1, mcc
from diffprune.errors import ConfigError


def test_cola_has_no_header_and_quotes_are_literal(tmp_path):
    (tmp_path / "CoLA").mkdir()
    rows = ['gj04\t1\t\tThe "cat" sat.', "gj04\t0\t*\tCat the sat."]
    for split in ("train", "dev"):
        (tmp_path / "CoLA" / f"{split}.tsv").write_text("\n".join(rows))  # no final newline
    data = load_task(get_task("cola"), tmp_path)
    assert [r["text"] for r in data.train] == ['The "cat" sat.', "Cat the sat."]
    assert [r["label"] for r in data.dev["dev"]] == [1, 0]


def test_mnli_has_two_dev_splits_and_label_names(tmp_path):
    (tmp_path / "MNLI").mkdir()
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label"
    row = "0\t1\t2\tg\tA man sleeps.\tA person rests.\tentailment"
    row2 = "1\t1\t2\tg\tA man sleeps.\tNobody sleeps.\tcontradiction"
    for name in ("train", "dev_matched", "dev_mismatched"):
        (tmp_path / "MNLI" / f"{name}.tsv").write_text("\n".join([head, row, row2]) + "\n")
    data = load_task(get_task("mnli"), tmp_path)
    assert set(data.dev) == {"matched", "mismatched"}
    assert [r["label"] for r in data.train] == [0, 2]
    assert data.train[0]["text_pair"] == "A person rests."


def test_glue_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="no SST-2/ folder"):
        load_task(get_task("sst2"), tmp_path)
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t7\n")
    with pytest.raises(DataError, match="unknown label '7'"):
        read_glue_tsv(get_task("sst2"), tmp_path / "SST-2" / "train.tsv")
    with pytest.raises(DataError, match="missing file"):
        load_task(get_task("sst2"), tmp_path)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("glue-sst3")


def test_custom_csv_files(tmp_path):
    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_text('q,a,y\n"hi, there",yo,1.5\nx,z,2\n')
    data = load_files(tmp_path / "train.csv", tmp_path / "dev.csv", "q", "a", "y",
                      regression=True)
    assert data.train[0] == {"text": "hi, there", "text_pair": "yo", "label": 1.5}
    assert data.task.metrics == ("pearson", "spearman")
    with pytest.raises(DataError, match="no column"):
        load_files(tmp_path / "train.csv", tmp_path / "dev.csv", "text")


def test_metrics_known_values():
    pred, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    assert f1(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert mcc(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    out = compute(("f1", "accuracy"), pred, gold)
    assert out["accuracy"] == pytest.approx(60.0)
    assert out["score"] == pytest.approx((out["f1"] + 60.0) / 2)
    reg = compute(("pearson", "spearman"), np.array([1.0, 2, 3]), np.array([2.0, 4, 7]))
    assert reg["spearman"] == pytest.approx(100.0)


def test_no_glue_source_is_a_clear_error(monkeypatch):
    import builtins
    monkeypatch.delenv("GLUE_DIR", raising=False)
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pass --data-dir or set GLUE_DIR"):
        load_task(get_task("rte"))
