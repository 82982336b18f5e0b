"""Inputs checked before any model loads: the constitution a pipeline names, duplicate YAML
keys, prompts longer than the context, degenerate preference pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = str(ROOT / "principles" / "harmless.yaml")


def _err(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("charter: error:") == 1, err
    return err


def test_run_check_refuses_a_missing_or_bad_constitution(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    pf = tmp_path / "pipe.yaml"
    pf.write_text(f"constitution: nothere.yaml\nharmful: {{path: {prompts}, eval: 1}}\n")
    err = _err(["run", str(pf), "--check"], capsys)
    assert f"{pf}:1: constitution: principle file {tmp_path}/nothere.yaml not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndescription: d\nprinciples:\n  - id: a\n    preference: '{{ nope }}'\n")
    pf.write_text(f"constitution: bad.yaml\nharmful: {{path: {prompts}, eval: 1}}\n")
    err = _err(["run", str(pf), "--check"], capsys)
    assert f"{bad}:5: principles[0].preference: principle 'a': undefined variable" in err, err


@pytest.mark.parametrize("where", ["pipeline", "config", "principles"])
def test_duplicate_yaml_keys_are_errors(where, tmp_path, capsys):
    f = tmp_path / "dup.yaml"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    if where == "pipeline":
        f.write_text(f"constitution: {CONSTITUTION}\nharmful: {{path: {prompts}}}\n"
                     "seed: 1\nseed: 2\n")
        argv, line = ["run", str(f), "--check"], 4
    elif where == "config":
        f.write_text("temperature: 0.5\nseed: 1\ntemperature: 0.7\n")
        argv, line = ["generate", "--config", str(f), "--prompts", str(prompts), "--out",
                      str(tmp_path / "o.jsonl"), "--backend", "fake"], 3
    else:
        f.write_text("name: x\ndescription: d\nprinciples:\n  - id: a\n    preference: Q?\n"
                     "    preference: Other?\n")
        argv, line = ["principles", "show", str(f)], 6
    err = _err(argv, capsys)
    assert f"{f}:{line}:" in err and "duplicate key" in err, err


def test_prompt_longer_than_the_context_fails_before_the_model_loads(tmp_path, capsys,
                                                                     tiny_model_dir,
                                                                     monkeypatch):
    import critique.backends.options as options

    def no_load(cfg):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(options, "build_backend", no_load)
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "short"}) + "\n" +
                 json.dumps({"prompt": "word " * 1500}) + "\n")
    tiny = str(tiny_model_dir)
    for cmd in (["generate", "--out", str(tmp_path / "o.jsonl"), "--prompts", str(p),
                 "--model", tiny],
                ["critique", "--constitution", CONSTITUTION, "--out", str(tmp_path / "c"),
                 "--no-progress", "--prompts", str(p), "--model", tiny],
                # label samples from the policy; eval answers with every model it compares
                ["label", "--constitution", CONSTITUTION, "--out", str(tmp_path / "l"),
                 "--prompts", str(p), "--policy", tiny, "--labeler", tiny],
                ["eval", "--out", str(tmp_path / "e"), "--harmful", str(p), "--model", tiny,
                 "--judge", tiny, "--constitution", CONSTITUTION]):
        err = _err(cmd, capsys)
        assert f"{p}:2: prompt is " in err and "context is 1024 tokens" in err, (cmd[0], err)


def test_degenerate_pairs_are_dropped_and_counted(tmp_path, capsys, tiny_model_dir):
    u = [{"role": "user", "content": "Hi?"}]
    same = {"prompt": u, "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Hello."}]}
    differ = {**same, "rejected": [{"role": "assistant", "content": "Go away."}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (differ, same, differ, same)))
    argv = ["train", "dpo", "--data", str(data), "--out", str(tmp_path / "dpo"), "--model",
            str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"dropped 2 pairs whose chosen equals rejected (first: {data}:2); training on 2" \
        in err, err
    data.write_text(json.dumps(same) + "\n")
    err = _err([*argv[:5], str(tmp_path / "dpo2"), *argv[6:]], capsys)
    assert "every pair has chosen equal to rejected" in err
