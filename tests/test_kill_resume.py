"""SIGKILL at random moments, re-run, and nothing is lost, duplicated or changed.

Each command runs as `python -m charter ...` in a subprocess (tests/kill_harness.py): critique
and labelling on the fake backend (slowed by CHARTER_FAKE_DELAY so a run lasts a second or two),
SFT and DPO on the tiny llama, and the whole pipeline. Every trial:

1. kills the command at a seeded random moment after it started working;
2. in half the trials also appends a torn half-line to the output (what a kill inside `write`
   leaves) or a half-written checkpoint folder (what a kill inside `save_checkpoint` leaves);
3. re-runs the same command to completion and checks: exit status 0; the outputs equal an
   uninterrupted reference run byte for byte (so nothing is lost or duplicated and resumed work
   matches fresh work); the records complete at the kill are a byte prefix of the final file;
   training says it resumed from its latest checkpoint and ends with a loadable model whose
   weights equal the reference run's.

Default trial counts keep the file near 2 minutes on 2 busy cores; `--trials N` runs N per
command (e.g. `pytest tests/test_kill_resume.py --trials 20`), and `pytest -m slow
tests/test_kill_resume.py` runs the soak (`test_soak`: 20/20/20/5/5/3 kills).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from tests.kill_harness import ROOT, charter_env, complete_lines, kill_run, tear, timed_run

CONSTITUTION = str(ROOT / "principles" / "harmless.yaml")
SEED = 20261125


def _n(trials: int | None, default: int) -> int:
    return trials if trials is not None else default


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"How do I do dangerous thing number {i}?"})
                            + "\n" for i in range(n)))
    return path


def _summary(name: str, results: list, progress: list) -> str:
    """One line for the log (docs/reliability.md quotes these): trials, kills, and how far each
    killed run had got (records finished, or the last complete checkpoint)."""
    killed = sum(r.killed for r in results)
    return (f"KILLS {name}: {len(results)} trials, {killed} killed mid-run; progress at the "
            f"kill: {progress}")


def _check_prefix(before: list[bytes], final: bytes, what: str) -> None:
    prefix = b"".join(before)
    assert final.startswith(prefix), f"{what}: records finished before the kill changed"


def _ids_unique(path: Path, key: str = "id") -> None:
    ids = [json.loads(line)[key] for line in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)), f"duplicate records in {path}"


# -- critique ------------------------------------------------------------------------------------


def test_critique_survives_kills(tmp_path, trials):
    prompts = _prompts(tmp_path / "prompts.jsonl", 16)
    env = charter_env(CHARTER_FAKE_DELAY="0.02")

    def argv(out: Path) -> list[str]:
        return ["critique", "--constitution", CONSTITUTION, "--prompts", str(prompts),
                "--out", str(out), "--backend", "fake", "--rounds", "2", "--batch-size", "2",
                "--no-progress"]

    ref_out = tmp_path / "ref"
    ref = timed_run(argv(ref_out), env=env, log=tmp_path / "ref.log",
                    trigger=ref_out / "records.jsonl")
    assert ref.returncode == 0, ref.output
    rng = random.Random(SEED)
    results, progress = [], []
    for t in range(_n(trials, 2)):
        out = tmp_path / f"trial-{t}"
        r = kill_run(argv(out), env=env, log=tmp_path / f"kill-{t}.log",
                     trigger=out / "records.jsonl", rng=rng, window=ref.after_trigger)
        results.append(r)
        before = complete_lines(out / "records.jsonl")
        progress.append(len(before))
        if rng.random() < 0.5:
            tear(out / "records.jsonl", rng)
        done = timed_run(argv(out), env=env, log=tmp_path / f"resume-{t}.log")
        assert done.returncode == 0, done.output
        final = (out / "records.jsonl").read_bytes()
        _check_prefix(before, final, f"trial {t}")
        for name in ("records.jsonl", "sft.jsonl", "pairs.jsonl"):
            assert (out / name).read_bytes() == (ref_out / name).read_bytes(), \
                f"trial {t}: {name} differs from the uninterrupted run"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["done"] == manifest["counts"]["prompts"] == 16
        assert manifest["counts"]["resumed"] == len(before)
        _ids_unique(out / "records.jsonl")
    print(_summary("critique", results, progress))


# -- labelling -----------------------------------------------------------------------------------


def test_label_pairs_survive_kills(tmp_path, trials):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "id": f"p{i}", "prompt": f"Question {i}?", "response_a": f"Sure, here is {i}.",
        "response_b": f"I can't help with {i}."}) + "\n" for i in range(20)))
    env = charter_env(CHARTER_FAKE_DELAY="0.005")

    def argv(out: Path) -> list[str]:
        return ["label", "--constitution", CONSTITUTION, "--pairs", str(pairs), "--out",
                str(out), "--backend", "fake", "--batch-size", "2",
                "--principles-per-pair", "2"]

    ref_out = tmp_path / "ref"
    ref = timed_run(argv(ref_out), env=env, log=tmp_path / "ref.log",
                    trigger=ref_out / "labels.jsonl")
    assert ref.returncode == 0, ref.output
    rng = random.Random(SEED + 1)
    results, progress = [], []
    for t in range(_n(trials, 2)):
        out = tmp_path / f"trial-{t}"
        results.append(kill_run(argv(out), env=env, log=tmp_path / f"kill-{t}.log",
                                trigger=out / "labels.jsonl", rng=rng,
                                window=ref.after_trigger))
        before = complete_lines(out / "labels.jsonl")
        progress.append(len(before))
        if rng.random() < 0.5:
            tear(out / "labels.jsonl", rng)
        done = timed_run(argv(out), env=env, log=tmp_path / f"resume-{t}.log")
        assert done.returncode == 0, done.output
        final = (out / "labels.jsonl").read_bytes()
        _check_prefix(before, final, f"trial {t}")
        assert final == (ref_out / "labels.jsonl").read_bytes(), f"trial {t}: labels differ"
        report = json.loads((out / "report.json").read_text())
        assert report["n"] == 20 and report["labelled_this_run"] == 20 - len(before)
    print(_summary("label --pairs", results, progress))


def test_label_prompts_survive_kills(tmp_path, trials):
    """Prompts mode: pairs of a prompt count as finished once its done-marker is written."""
    prompts = _prompts(tmp_path / "prompts.jsonl", 12)
    env = charter_env(CHARTER_FAKE_DELAY="0.005")

    def argv(out: Path) -> list[str]:
        return ["label", "--constitution", CONSTITUTION, "--prompts", str(prompts), "--out",
                str(out), "--backend", "fake", "--batch-size", "2", "--samples", "3",
                "--principles-per-pair", "1"]

    ref_out = tmp_path / "ref"
    ref = timed_run(argv(ref_out), env=env, log=tmp_path / "ref.log",
                    trigger=ref_out / "pairs.jsonl")
    assert ref.returncode == 0, ref.output
    rng = random.Random(SEED + 2)
    results, progress = [], []
    for t in range(_n(trials, 2)):
        out = tmp_path / f"trial-{t}"
        results.append(kill_run(argv(out), env=env, log=tmp_path / f"kill-{t}.log",
                                trigger=out / "pairs.jsonl", rng=rng,
                                window=ref.after_trigger))
        marks = {json.loads(m)["key"] for m in complete_lines(out / "prompts_done.jsonl")}
        before = [ln for ln in complete_lines(out / "pairs.jsonl")
                  if json.loads(ln)["prompt_key"] in marks]
        progress.append(len(marks))
        if rng.random() < 0.5:
            tear(out / "pairs.jsonl", rng)
        done = timed_run(argv(out), env=env, log=tmp_path / f"resume-{t}.log")
        assert done.returncode == 0, done.output
        final = (out / "pairs.jsonl").read_bytes()
        _check_prefix(before, final, f"trial {t}")
        assert final == (ref_out / "pairs.jsonl").read_bytes(), f"trial {t}: pairs differ"
        _ids_unique(out / "pairs.jsonl")
    print(_summary("label --prompts", results, progress))


# -- training ------------------------------------------------------------------------------------


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _train_trials(tmp_path: Path, stage: str, data: Path, model: Path, n: int, seed: int):
    from charter.cli import main

    env = charter_env()
    steps = 8

    def argv(out: Path) -> list[str]:
        return ["train", stage, "--data", str(data), "--out", str(out), "--model", str(model),
                "--batch-size", "2", "--max-steps", str(steps), "--save-every", "1",
                "--lr", "1e-3", "--warmup-ratio", "0"]

    # The reference run is in-process (torch is already imported here: saves a start-up).
    ref_out = tmp_path / "ref"
    assert main(argv(ref_out)) == 0
    ref_w = _weights(ref_out / "final")
    rng = random.Random(seed)
    results, progress = [], []
    for t in range(n):
        out = tmp_path / f"trial-{t}"
        # The kill lands at a seeded random step: up to 0.5 s after checkpoint k appears (k = 0:
        # after the run directory is set up), so it can hit a step or a checkpoint being saved.
        k = rng.randrange(steps)
        trigger = out / ("train_config.json" if k == 0 else f"checkpoint-{k}")
        results.append(kill_run(argv(out), env=env, log=tmp_path / f"kill-{t}.log",
                                trigger=trigger, rng=rng, window=0.5))
        ckpts = sorted((int(d.name.split("-")[1]) for d in out.glob("checkpoint-*")
                        if (d / "manifest.json").exists()), reverse=True)
        finished = (out / "final" / "config.json").exists()  # killed after saving final/
        progress.append("final saved" if finished else
                        f"step {ckpts[0]}" if ckpts else "no checkpoint")
        if rng.random() < 0.5 and out.exists() and not finished:
            # a checkpoint half written when the kill came, and a torn metrics line
            partial = out / f".checkpoint-{(ckpts[0] if ckpts else 0) + 1}.tmp"
            partial.mkdir(exist_ok=True)
            (partial / "model.safetensors").write_bytes(b"\x08\x00 truncated")
            tear(out / "metrics.jsonl", rng)
        done = timed_run(argv(out), env=env, log=tmp_path / f"resume-{t}.log")
        assert done.returncode == 0, done.output
        if finished:
            assert "already trained" in done.output, done.output
        elif ckpts:
            assert re.search(rf"resuming from \S*checkpoint-{ckpts[0]} \(step {ckpts[0]}",
                             done.output), done.output
        assert not list(out.glob(".checkpoint-*.tmp")), "partial checkpoint left behind"
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), "metrics lost or doubled"
        w = _weights(out / "final")
        assert w.keys() == ref_w.keys()
        for k in w:
            assert (w[k] - ref_w[k]).abs().max().item() < 1e-5, \
                f"trial {t}: {k} differs from the uninterrupted run"
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out / "final")  # loads
        shutil.rmtree(out)
    return results, progress


def test_sft_survives_kills(tmp_path, trials, tiny_model_dir):
    u = {"role": "user", "content": "hi"}
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [u, {"role": "assistant", "content":
                    f"Hello number {i}, how can I help?"}]}) + "\n" for i in range(8)))
    results = _train_trials(tmp_path, "sft", data, tiny_model_dir, _n(trials, 1), SEED + 3)
    print(_summary("train sft", *results))


def test_dpo_survives_kills(tmp_path, trials, tiny_model_dir):
    u = {"role": "user", "content": "How do I pick a lock?"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": [u], "chosen": [{"role": "assistant", "content": f"I can't help {i}."}],
        "rejected": [{"role": "assistant", "content": f"Use a pick {i}."}], "p_chosen": 0.8})
        + "\n" for i in range(8)))
    results = _train_trials(tmp_path, "dpo", data, tiny_model_dir, _n(trials, 1), SEED + 4)
    print(_summary("train dpo", *results))


# -- the pipeline --------------------------------------------------------------------------------


def test_pipeline_survives_kills(tmp_path, trials, tiny_model_dir, monkeypatch):
    prompts = _prompts(tmp_path / "red.jsonl", 10)
    pf = tmp_path / "pipe.yaml"
    pf.write_text(f"""\
constitution: {CONSTITUTION}
model: {tiny_model_dir}
backend: fake
judge: null
harmful: {{path: {prompts}, eval: 2}}
critique: {{rounds: 1, batch_size: 2, progress: false}}
sft: {{max_steps: 3, batch_size: 2, save_every: 1}}
label: {{samples: 2, batch_size: 2, principles_per_pair: 1}}
dpo: {{max_steps: 3, batch_size: 2, save_every: 1}}
eval: {{max_new_tokens: 16}}
""")
    from charter.cli import main

    env = charter_env(CHARTER_FAKE_DELAY="0.01")
    # Records name the run directory (the policy is OUT/sft/final), so every run uses the same
    # OUT; the in-process reference run is moved aside.
    out, ref_out = tmp_path / "run", tmp_path / "ref"
    argv = ["run", str(pf), "--out", str(out)]
    monkeypatch.setenv("CHARTER_FAKE_DELAY", "0.01")
    assert main(argv) == 0
    out.rename(ref_out)
    rng = random.Random(SEED + 5)
    results, progress = [], []
    for t in range(_n(trials, 1)):
        shutil.rmtree(out, ignore_errors=True)
        # The kill lands in a seeded random stage: up to 2 s after its directory appears.
        stage = rng.choice(["critique", "sft", "label", "dpo", "eval"])
        results.append(kill_run(argv, env=env, log=tmp_path / f"kill-{t}.log",
                                trigger=out / stage, rng=rng, window=2.0))
        before = complete_lines(out / "critique" / "records.jsonl")
        progress.append(",".join(sorted(d.parent.name for d in out.glob("*/DONE.json")))
                        or "no stage done")
        done = timed_run(argv, env=env, log=tmp_path / f"resume-{t}.log")
        assert done.returncode == 0, done.output
        summary = json.loads((out / "summary.json").read_text())
        assert all(s["status"] in ("done", "skipped") for s in summary["stages"]), summary
        assert Path(summary["final_model"]).is_dir()
        final = (out / "critique" / "records.jsonl").read_bytes()
        _check_prefix(before, final, f"trial {t}")
        for rel in ("critique/records.jsonl", "critique/sft.jsonl", "label/pairs.jsonl"):
            assert (out / rel).read_bytes() == (ref_out / rel).read_bytes(), f"{rel} differs"
        w, ref_w = _weights(out / "dpo" / "final"), _weights(ref_out / "dpo" / "final")
        assert all((w[k] - ref_w[k]).abs().max().item() < 1e-5 for k in w), "DPO model differs"
    print(_summary("run (pipeline)", results, progress))



@pytest.mark.slow
def test_soak(tmp_path, trials, tiny_model_dir, monkeypatch):
    """`pytest -m slow tests/test_kill_resume.py [--trials N]`: every command above, N kills
    each (default 20 for critique and labelling, 5 for training, 3 for the pipeline)."""
    for name, fn, default in (("critique", test_critique_survives_kills, 20),
                              ("pairs", test_label_pairs_survive_kills, 20),
                              ("prompts", test_label_prompts_survive_kills, 20)):
        (tmp_path / name).mkdir()
        fn(tmp_path / name, trials or default)
    for name, fn, default in (("sft", test_sft_survives_kills, 5),
                              ("dpo", test_dpo_survives_kills, 5)):
        (tmp_path / name).mkdir()
        fn(tmp_path / name, trials or default, tiny_model_dir)
    (tmp_path / "run").mkdir()
    test_pipeline_survives_kills(tmp_path / "run", trials or 3, tiny_model_dir, monkeypatch)
