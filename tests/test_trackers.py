"""report_to: csv through accelerate's trackers (TRL's metric names), clear errors for the
trackers whose package is missing."""

from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from charter.core.errors import CharterError
from training.trackers import CSVTracker, log_with


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_tracker_grows_columns_and_resumes_without_duplicates(tmp_path):
    f = tmp_path / "metrics.csv"
    t = CSVTracker(f)
    t.log({"loss": 1.0}, step=1)
    t.log({"loss": 0.5, "grad_norm": 2.0}, step=2)  # a new column: the file is rewritten
    t.log({"loss": 0.25, "grad_norm": 1.0}, step=3)
    assert [r["step"] for r in read_csv(f)] == ["1", "2", "3"]
    assert read_csv(f)[0]["grad_norm"] == "" and read_csv(f)[2]["grad_norm"] == "1.0"
    again = CSVTracker(f)  # a resumed run from step 1 logs step 2 next
    again.log({"loss": 0.4, "grad_norm": 1.5}, step=2)
    assert [(r["step"], r["loss"]) for r in read_csv(f)] == [("1", "1.0"), ("2", "0.4")]


@pytest.mark.parametrize("name, hint", [("tensorboard", "pip install tensorboard"),
                                        ("wandb", "pip install 'charter[wandb]'")])
def test_a_missing_tracker_package_names_the_install(monkeypatch, name, hint):
    monkeypatch.setitem(sys.modules, name, None)  # import fails, installed or not
    with pytest.raises(CharterError, match=rf"report_to: {name} needs the {name} package.*"
                                           + re.escape(hint)):
        log_with([name], "out")
    with pytest.raises(CharterError, match="unknown tracker 'mlflowx'"):
        log_with(["mlflowx"], "out")
    assert log_with(["none"], "out") == []


def test_sft_reports_to_csv_with_the_jsonl_metric_names(tmp_path, tiny_model_dir):
    from training.options import SFTConfig
    from training.sft import train_sft

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}."}]} for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train_sft(SFTConfig(data=str(data), out=str(out), model=str(tiny_model_dir), max_steps=2,
                        batch_size=2, save_every=None, report_to=["csv"]))
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in got] == [r["step"] for r in jsonl] == [1, 2]
    assert set(got[0]) == set(jsonl[0]) - {"step"} | {"step"}
    assert float(got[1]["loss"]) == pytest.approx(jsonl[1]["loss"])
