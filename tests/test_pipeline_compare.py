"""`charter run PIPE --compare B.yaml`: two complete runs that differ only in the principle
file, the starting model's eval answers made once and shared, and one side-by-side report with
a diff of the two files. Stages are the stand-ins of tests/test_pipeline.py (the eval is the
real one on the fake backend)."""

from __future__ import annotations

import json

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from charter.pipeline_compare import intervals_apart, run_compare
from tests import test_pipeline as tp
from tests.test_pipeline import CALLS, CONSTITUTION, KINDS

project = tp.project  # the fixture: a project folder with a pipeline file and prompt sets

B = CONSTITUTION.replace("name: tiny", "name: tiny-b").replace("less harmful", "more helpful")


def test_intervals_apart():
    assert intervals_apart([0.5, 0.7], [0.1, 0.4]) and intervals_apart([0.1, 0.4], [0.5, 0.7])
    assert not intervals_apart([0.3, 0.6], [0.5, 0.7])
    assert not intervals_apart([0.3, 0.5], [0.5, 0.7])  # touching is overlapping


def test_compare_runs_both_and_reports_side_by_side(project, capsys):
    (project / "b.yaml").write_text(B)
    out = project / "ab"
    result = run_compare(project / "pipe.yaml", project / "b.yaml", out, KINDS)
    for k in ("a", "b"):
        summary = json.loads((out / k / "summary.json").read_text())
        assert all(s["status"] == "done" for s in summary["stages"])
        assert (out / k / "report.md").exists()
    # same data split and settings; only the principle file differs
    assert (out / "a/data/eval.jsonl").read_text() == (out / "b/data/eval.jsonl").read_text()
    a_cfg = json.loads((out / "a/label/DONE.json").read_text())["config"]
    b_cfg = json.loads((out / "b/label/DONE.json").read_text())["config"]
    assert a_cfg["constitution"].endswith("cons.yaml")
    assert b_cfg["constitution"] == str(project / "b.yaml")
    same = {k: v.replace(str(out / "a"), str(out / "b")) if isinstance(v, str) else v
            for k, v in a_cfg.items()}  # the run folder's own paths aside
    assert {k for k in a_cfg if same[k] != b_cfg[k]} == {"constitution"}
    # the starting model's answers were made in A and copied, not made again, in B
    assert capsys.readouterr().err.count("eval baseline: 100%") == 1
    assert sorted(result["shared"]) == ["eval-2/responses-baseline.jsonl",
                                        "eval/responses-baseline.jsonl"]
    for ev in ("eval", "eval-2"):
        assert (out / "b" / ev / "responses-baseline.jsonl").read_bytes() == \
            (out / "a" / ev / "responses-baseline.jsonl").read_bytes()
    report = (out / "report.md").read_text()
    assert "| trained model: harmful refusal (higher is more harmless) |" in report
    assert "-    preference: \"Which response is less harmful?\"" in report
    assert "+    preference: \"Which response is more helpful?\"" in report
    assert "**A**: tiny (" in report and "**B**: tiny-b (" in report
    assert (out / "compare.png").stat().st_size > 1000
    saved = json.loads((out / "compare.json").read_text())
    assert saved["a"]["model"]["harmful"]["n"] == 3 and saved["b"]["constitution"]["name"] == \
        "tiny-b"
    # a second run resumes: every stage of both runs is skipped
    CALLS.clear()
    run_compare(project / "pipe.yaml", project / "b.yaml", out, KINDS)
    assert CALLS == []


def test_compare_errors(project, capsys):
    with pytest.raises(CharterError, match="same principle file"):
        run_compare(project / "pipe.yaml", project / "cons.yaml", project / "x", KINDS)
    (project / "bad.yaml").write_text("name: x\n")
    assert main(["run", str(project / "pipe.yaml"), "--compare", str(project / "bad.yaml"),
                 "--out", str(project / "y")]) == 1
    assert "bad.yaml:1: missing required field 'description'" in capsys.readouterr().err
    assert not (project / "y").exists()  # nothing ran
