"""`charter run`: validation (file:line), wiring, stage skipping and resume after a kill.

The stages here are fakes with the same wiring fields as the real ones (so the runner's logic is
tested alone, in milliseconds); the eval stage is the real one on the fake backend.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from charter.pipeline import STAGE_KINDS, run_pipeline

CALLS: list[str] = []
KILL_AT: set[str] = set()


@dataclass(kw_only=True)
class FakeCritiqueConfig:
    constitution: str
    prompts: str
    out: str
    helpful_prompts: str | None = None
    model: str | None = None
    teacher: str | None = None
    backend: str = "transformers"
    seed: int = 0
    rounds: int = 1


@dataclass(kw_only=True)
class FakeTrainConfig:
    data: str
    out: str
    model: str | None = None
    seed: int = 0
    max_steps: int = 3


@dataclass(kw_only=True)
class FakeLabelConfig:
    constitution: str
    out: str
    prompts: str | None = None
    pairs: str | None = None
    policy: str | None = None
    labeler: str | None = None
    second_labeler: str | None = None
    backend: str = "transformers"
    seed: int = 0
    samples: int = 2
    extra: list = field(default_factory=list)


def _step(name: str, cfg) -> None:
    CALLS.append(f"{name}:{Path(cfg.out).name}")
    if Path(cfg.out).name in KILL_AT:
        KILL_AT.discard(Path(cfg.out).name)
        raise KeyboardInterrupt  # as if the process were killed mid-stage


def fake_critique(cfg, ctx):
    _step("critique", cfg)
    n = len(Path(cfg.prompts).read_text().splitlines())
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "sft.jsonl").write_text("{}\n" * n)
    return {"counts": {"done": n}}


def fake_train(cfg, ctx):
    _step("train", cfg)
    assert Path(cfg.data).exists(), "a stage ran before its input existed"
    final = Path(cfg.out) / "final"
    final.mkdir(parents=True, exist_ok=True)
    (final / "config.json").write_text(json.dumps({"from": cfg.model}))
    (Path(cfg.out) / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    return {"final_model": str(final), "steps": 3}


def fake_label(cfg, ctx):
    _step("label", cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "pairs.jsonl").write_text("{}\n")
    return {"pairs": 1, "policy": cfg.policy, "labeler": cfg.labeler}


def _fake(kind: str, config: str, run):
    """The real stage kind (wiring, inputs, outputs) with a fake config and run."""
    return dataclasses.replace(STAGE_KINDS[kind], config=f"tests.test_pipeline:{config}",
                               runner=run)


KINDS = {
    "critique": _fake("critique", "FakeCritiqueConfig", fake_critique),
    "sft": _fake("sft", "FakeTrainConfig", fake_train),
    "label": _fake("label", "FakeLabelConfig", fake_label),
    "dpo": _fake("dpo", "FakeTrainConfig", fake_train),
    "eval": STAGE_KINDS["eval"],  # the real eval, on the fake backend
}

CONSTITUTION = """\
name: tiny
description: for tests
principles:
  - id: harmless
    preference: "Which response is less harmful?"
"""

PIPELINE = """\
constitution: cons.yaml
backend: fake
iterations: 2
labeler: policy
harmful: {path: data/harmful.jsonl, eval: 3, train: 4}
benign:
  path: data/benign.jsonl
  eval: 2
  train: 2
sft: {max_steps: 3}
eval:
  max_new_tokens: 8
  bootstrap: 20
"""


@pytest.fixture
def project(tmp_path):
    CALLS.clear()
    KILL_AT.clear()
    (tmp_path / "cons.yaml").write_text(CONSTITUTION)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "harmful.jsonl").write_text(
        "".join(json.dumps({"prompt": f"harmful request {i}"}) + "\n" for i in range(8)))
    (tmp_path / "data" / "benign.jsonl").write_text(
        "".join(json.dumps({"instruction": f"benign task {i}"}) + "\n" for i in range(5)))
    (tmp_path / "pipe.yaml").write_text(PIPELINE)
    return tmp_path


def test_full_run_wiring_and_outputs(project):
    out = project / "run"
    summary = run_pipeline(project / "pipe.yaml", out, KINDS)
    names = [s["name"] for s in summary["stages"]]
    assert names == ["critique", "sft", "label", "dpo", "eval", "label-2", "dpo-2", "eval-2"]
    assert all(s["status"] == "done" for s in summary["stages"])
    # each stage's resident memory: its own high-water mark, at least where it started
    for s in summary["stages"]:
        assert 0 < s["memory"]["start_mb"] <= s["memory"]["peak_mb"], s
    assert "| stage | status | seconds | peak memory (MB) | result |" in \
        (out / "report.md").read_text()
    assert summary["final_model"] == str((out / "dpo-2" / "final").resolve())
    # held-out split: 3 + 2 eval prompts, 4 harmful + 2 benign train prompts, disjoint
    ev = [json.loads(x) for x in (out / "data" / "eval.jsonl").read_text().splitlines()]
    tr = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["label"] for r in ev] == ["harmful"] * 3 + ["benign"] * 2
    assert len(tr) == 6 and not {r["id"] for r in ev} & {r["id"] for r in tr}
    # wiring: SFT trains the start model on critique's output; label-2's policy and labeller
    # (labeler: policy) are the first DPO model; dpo-2 starts from it; eval-2 evaluates dpo-2.
    done = {n: json.loads((out / n / "DONE.json").read_text())["config"] for n in names}
    assert done["sft"]["data"] == str(out / "critique" / "sft.jsonl")
    assert done["sft"]["model"] == "smollm2" and done["sft"]["max_steps"] == 3
    assert done["label"]["policy"] == str(out / "sft")
    assert done["label-2"]["policy"] == done["label-2"]["labeler"] == str(out / "dpo")
    assert done["dpo-2"]["model"] == str(out / "dpo")
    assert done["dpo-2"]["data"] == str(out / "label-2" / "pairs.jsonl")
    assert done["eval-2"]["model"] == str(out / "dpo-2")
    assert done["eval-2"]["baseline"] == "smollm2" and done["eval-2"]["judge"] == "smollm2"
    assert done["critique"]["helpful_prompts"] == str(out / "data" / "benign-train.jsonl")
    assert done["critique"]["backend"] == "fake"  # top-level default reaches the section
    assert [p["name"] for p in summary["trend"]] == ["start", "dpo-1", "dpo-2"]
    for f in ("summary.json", "report.md", "trend.png", "eval-2/report.md", "eval/training.png"):
        assert (out / f).exists(), f
    assert "| eval-2 | done |" in (out / "report.md").read_text()


def test_stages_declare_inputs_and_outputs_and_the_runner_checks_them(project):
    """--check lists each stage's inputs and outputs (sft reads critique's sft.jsonl, label-2
    samples from dpo/); a stage that finishes without its output, or whose input from an
    earlier stage is gone, is one clear error; a kind reading what no stage writes is refused
    when planning."""
    out = project / "run"
    plan = {s["name"]: s for s in run_pipeline(project / "pipe.yaml", out, KINDS,
                                               check=True)["stages"]}
    assert plan["sft"]["inputs"]["data"] == str(out / "critique" / "sft.jsonl")
    assert plan["critique"]["outputs"] == {"sft": str(out / "critique" / "sft.jsonl")}
    assert plan["label-2"]["inputs"]["policy"] == str(out / "dpo")
    assert plan["dpo"]["outputs"] == {"model": str(out / "dpo" / "final")}

    def lazy(cfg, ctx):  # "finishes" without writing sft.jsonl
        _step("critique", cfg)
        return {}

    kinds = {**KINDS, "critique": dataclasses.replace(KINDS["critique"], runner=lazy)}
    with pytest.raises(CharterError, match=r"critique/sft\.jsonl: stage critique finished "
                                           r"without writing its sft"):
        run_pipeline(project / "pipe.yaml", out, kinds)
    assert not (out / "critique" / "DONE.json").exists()

    KILL_AT.add("sft")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(project / "pipe.yaml", out, KINDS)
    (out / "critique" / "sft.jsonl").unlink()
    with pytest.raises(CharterError, match=r"critique/sft\.jsonl: stage sft needs its data "
                                           r"from an earlier stage, but it is missing"):
        run_pipeline(project / "pipe.yaml", out, KINDS)

    class Astray(type(KINDS["sft"])):
        def inputs(self, cfg):
            return {"data": Path(cfg.out).parent / "nowhere.jsonl"}

    kinds = {**KINDS, "sft": Astray(**{f.name: getattr(KINDS["sft"], f.name)
                                        for f in dataclasses.fields(KINDS["sft"])})}
    with pytest.raises(CharterError, match=r"stage sft reads data = .*nowhere\.jsonl, which "
                                           r"no earlier stage writes"):
        run_pipeline(project / "pipe.yaml", project / "run2", kinds, check=True)


def test_killed_pipeline_resumes_without_redoing_finished_stages(project):
    out = project / "run"
    KILL_AT.add("label-2")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(project / "pipe.yaml", out, KINDS)
    first = list(CALLS)
    assert first[-1] == "label:label-2"
    s = json.loads((out / "summary.json").read_text())
    status = {st["name"]: st["status"] for st in s["stages"]}
    assert status["label-2"] == "interrupted" and status["dpo-2"] == "pending"
    assert status["eval"] == "done" and not (out / "label-2" / "DONE.json").exists()
    CALLS.clear()
    summary = run_pipeline(project / "pipe.yaml", out, KINDS)
    assert CALLS == ["label:label-2", "train:dpo-2"]  # eval-2 is the real eval (not counted)
    status = {st["name"]: st["status"] for st in summary["stages"]}
    assert [status[n] for n in ("critique", "sft", "label", "dpo", "eval")] == ["skipped"] * 5
    assert status["label-2"] == status["dpo-2"] == status["eval-2"] == "done"
    # eval-2 reused the starting model's responses from eval/ instead of generating them again
    assert (out / "eval-2" / "responses-baseline.jsonl").read_text() == \
        (out / "eval" / "responses-baseline.jsonl").read_text()
    CALLS.clear()
    run_pipeline(project / "pipe.yaml", out, KINDS)  # everything done: nothing runs
    assert CALLS == []


def test_finished_stage_from_an_older_version_without_a_new_setting_is_kept(project):
    """A DONE.json whose config lacks a field that now exists with its default value (a setting
    added to the stage later) still counts as done; a different data split does not."""
    out = project / "run"
    run_pipeline(project / "pipe.yaml", out, KINDS)
    done_path = out / "sft" / "DONE.json"
    done = json.loads(done_path.read_text())
    del done["config"]["seed"]  # as if written before `seed` existed (default 0)
    done["fingerprint"] = "older"
    done_path.write_text(json.dumps(done))
    CALLS.clear()
    run_pipeline(project / "pipe.yaml", out, KINDS)
    assert CALLS == []
    done["data"] = "another split"
    done_path.write_text(json.dumps(done))
    with pytest.raises(CharterError, match="the prompt data split"):
        run_pipeline(project / "pipe.yaml", out, KINDS)


def test_changed_settings_of_a_finished_stage_is_an_error(project):
    out = project / "run"
    run_pipeline(project / "pipe.yaml", out, KINDS)
    text = (project / "pipe.yaml").read_text().replace("max_steps: 3", "max_steps: 5")
    (project / "pipe.yaml").write_text(text)
    with pytest.raises(CharterError, match=r"run/sft: this stage finished with other settings "
                       r"\(max_steps: 3 → 5\)"):
        run_pipeline(project / "pipe.yaml", out, KINDS)
    # deleting sft alone is not enough: the stages after it were made from the old model
    import shutil

    shutil.rmtree(out / "sft")
    with pytest.raises(CharterError, match="sft must run again, but label, dpo"):
        run_pipeline(project / "pipe.yaml", out, KINDS)


@pytest.mark.parametrize("edit, message", [
    (("iterations: 2", "iterations: 2\nepochs: 3"), r"pipe\.yaml:4: epochs: unknown config key"),
    (("sft: {max_steps: 3}", "sft: {max_steps: 3, warp: 9}"),
     r"pipe\.yaml:10: warp: unknown config key"),
    (("  bootstrap: 20", "  bootstrap: 20\n  out: elsewhere"),
     r"pipe\.yaml:14: eval\.out: set by the pipeline runner"),
    (("  train: 2\n", "  train: lots\n"), r"pipe\.yaml:9: train: .*lots"),
    (("eval: 3, train: 4", "eval: 3, train: 40"), r"harmful\.jsonl: the harmful set has 8"),
    (("eval: 3, train: 4}\nbenign:\n  path: data/benign.jsonl\n  eval: 2",
      "eval: 0, train: 4}\nbenign:\n  path: data/benign.jsonl\n  eval: 0"),
     r"pipe\.yaml:5: harmful: no prompts held out"),
    (("constitution: cons.yaml\n", ""), r"missing required setting\(s\): --constitution"),
    (("harmful: {path: data/harmful.jsonl", "harmful: {path: data/nothere.jsonl"),
     r"nothere\.jsonl: prompts file not found"),
])
def test_pipeline_file_errors_before_any_stage_runs(project, edit, message):
    text = (project / "pipe.yaml").read_text()
    assert edit[0] in text
    (project / "pipe.yaml").write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(CharterError, match=message):
        run_pipeline(project / "pipe.yaml", project / "run", KINDS)
    assert CALLS == [] and not (project / "run" / "critique").exists()


def test_check_validates_and_runs_nothing(project, capsys):
    plan = run_pipeline(project / "pipe.yaml", project / "run", KINDS, check=True)
    assert [s["status"] for s in plan["stages"]] == ["pending"] * 8
    assert plan["data"] == {"harmful-train": 4, "benign-train": 2, "eval": 5, "train": 6}
    assert CALLS == [] and not (project / "run").exists()


def test_cli_run_reports_bad_file_on_one_line(project, capsys):
    (project / "bad.yaml").write_text("constitution: cons.yaml\nharmful: {path: x}\nsteps: 1\n")
    assert main(["run", str(project / "bad.yaml"), "--out", str(project / "r")]) == 1
    assert "bad.yaml:3: steps: unknown config key" in capsys.readouterr().err


def test_critique_stage_that_writes_no_sft_data_fails_clearly(tmp_path, monkeypatch):
    """The real critique stage on a backend whose answers are all empty: every record is
    flagged, so SFT would have nothing to train on; the pipeline says so, naming the records."""
    from charter.pipeline import STAGE_KINDS, Context
    from critique.backends.fake import FakeBackend
    from critique.revise.run import CritiqueConfig

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")
    cfg = CritiqueConfig(constitution=str(Path(__file__).parents[1] / "principles" /
                                          "harmless.yaml"),
                         prompts=str(tmp_path / "p.jsonl"), out=str(tmp_path / "c"),
                         backend="fake", progress=False)
    from charter.roles import BackendPool, make_spec

    ctx = Context(BackendPool(loader=lambda spec: FakeBackend(lambda conv, prefix: "")))
    ctx.roles = {"policy": make_spec("fake", None)}
    with pytest.raises(CharterError, match=r"records\.jsonl: critique wrote no SFT examples"):
        STAGE_KINDS["critique"].run(cfg, ctx)


def test_moved_run_folder_resumes_with_nothing_redone(project):
    """A finished run folder copied or moved elsewhere (`mv runs/a runs/b`) is still finished:
    paths inside it are compared relative to the folder; a path outside it still counts."""
    import shutil

    from charter.core.runlock import release_all

    out = project / "run"
    run_pipeline(project / "pipe.yaml", out, KINDS)
    release_all()  # as when the first process ended (its locks die with it)
    moved = project / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    CALLS.clear()
    summary = run_pipeline(project / "pipe.yaml", moved, KINDS)
    assert CALLS == []
    assert all(st["status"] == "skipped" for st in summary["stages"])
    assert all(st["memory"]["peak_mb"] > 0 for st in summary["stages"])  # kept from DONE.json
    assert summary["final_model"].startswith(str(moved.resolve()))
    # a setting that names a path outside the run folder is still a difference
    done_path = moved / "sft" / "DONE.json"
    done = json.loads(done_path.read_text())
    done["config"]["model"] = str(project / "another-model")
    done["fingerprint"] = "other"
    done_path.write_text(json.dumps(done))
    with pytest.raises(CharterError, match="model"):
        run_pipeline(project / "pipe.yaml", moved, KINDS)
