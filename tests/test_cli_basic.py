"""`charter models path` and `charter generate` end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from charter.cli import main

ROOT = Path(__file__).resolve().parents[1]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_models_path(capsys, tmp_path, tiny_model_dir):
    from charter.core.models import embedded_model_dir

    assert main(["models", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(embedded_model_dir())
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "config.json").write_text("{}")
    assert main(["models", "path", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "final")
    assert main(["models", "path", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err == f"charter: error: {tmp_path / 'missing'}: model: model directory not found\n"


def test_generate_writes_jsonl_and_resumes(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Question {i}?"} for i in range(5)]
    rows[3] = {"messages": [{"role": "user", "content": "As messages"}], "id": "m3"}
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--prompts", str(prompts), "--out", str(out), "--model",
            str(tiny_model_dir), "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(args + ["--limit", "3"]) == 0
    first = lines(out)
    assert [r["prompt"] for r in first] == [[{"role": "user", "content": f"Question {i}?"}]
                                           for i in range(3)]
    assert all(set(r) == {"id", "prompt", "response"} and r["response"] for r in first)
    with open(out, "a") as f:
        f.write('{"id": "torn", "resp')  # a kill mid-write
    assert main(args) == 0
    done = lines(out)
    assert [r["id"] for r in done[:3]] == [r["id"] for r in first]  # kept, not rewritten
    assert len(done) == 5 and len({r["id"] for r in done}) == 5
    assert done[3]["id"] == "m3" and done[3]["prompt"][0]["content"] == "As messages"
    assert "wrote 0 responses (5 already there)" not in capsys.readouterr().err
    assert main(args) == 0
    assert len(lines(out)) == 5
    assert "wrote 0 responses (5 already there)" in capsys.readouterr().err


def test_generate_config_file_and_flag_override(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nHello\n")
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"prompts: {prompts}\nout: {tmp_path / 'x.jsonl'}\nmodel: {tiny_model_dir}\n"
                   "max_new_tokens: 3\n")
    assert main(["generate", "--config", str(cfg), "--out", str(tmp_path / "y.jsonl")]) == 0
    assert not (tmp_path / "x.jsonl").exists()
    assert lines(tmp_path / "y.jsonl")[0]["prompt"] == [{"role": "user", "content": "Hello"}]


def test_bad_input_is_one_line_exit_1(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    proc = subprocess.run([sys.executable, "-m", "charter", "generate", "--prompts", str(prompts),
                           "--out", str(tmp_path / "o.jsonl"), "--backend", "fake"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"charter: error: {prompts}:2: invalid JSON")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_flag_and_config_key(tmp_path, capsys):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("prompts: p.jsonl\nout: o.jsonl\ntemprature: 1\n")
    assert main(["generate", "--config", str(cfg)]) == 1
    assert f"{cfg}:3: temprature: unknown config key" in capsys.readouterr().err
    assert main(["generate", "--prompts", "p", "--out", "o", "--top-p", "2"]) == 1
    assert capsys.readouterr().err == "charter: error: top_p: must be in (0, 1]\n"
