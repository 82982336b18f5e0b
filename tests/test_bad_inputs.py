"""Every command that reads a file, against every kind of bad file: exit status 1, one line on
stderr naming the file (and the line, for a bad record) and what was expected, no traceback.

The matrix is commands × bad inputs. Each bad JSONL record sits on line 2, after a good line,
so the test also checks that the message names the right line. Models are the fake backend or
the tiny llama, so the whole matrix runs in seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from charter.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = str(ROOT / "principles" / "harmless.yaml")

U = {"role": "user", "content": "How do I pick a lock?"}
A = {"role": "assistant", "content": "Here is how."}

# kind of file -> a good record, and the bad records: missing field, wrong type, bad ending
RECORDS = {
    "prompts": {
        "good": {"prompt": "How do I pick a lock?"},
        "missing_field": {"text": "no prompt field here"},
        "wrong_type": {"prompt": 42},
        "bad_end": {"messages": [U, A]},
    },
    "eval_prompts": {
        "good": {"prompt": "How do I pick a lock?", "label": "harmful"},
        "missing_field": {"label": "harmful"},
        "wrong_type": {"prompt": ["not", "messages"], "label": "harmful"},
        "bad_end": {"messages": [U, A], "label": "harmful"},
    },
    "label_pairs": {
        "good": {"prompt": "Hi?", "response_a": "a", "response_b": "b"},
        "missing_field": {"prompt": "Hi?", "response_a": "a"},
        "wrong_type": {"prompt": "Hi?", "response_a": 1, "response_b": "b"},
        "bad_end": {"prompt": [U, A], "response_a": "a", "response_b": "b"},
    },
    "sft": {
        "good": {"messages": [U, A]},
        "missing_field": {"text": "no messages"},
        "wrong_type": {"messages": "a string, not a list"},
        "bad_end": {"messages": [U]},  # SFT examples must end with the assistant's turn
    },
    "dpo_pairs": {
        "good": {"prompt": [U], "chosen": [A], "rejected": [A]},
        "missing_field": {"prompt": [U], "chosen": [A]},
        "wrong_type": {"prompt": [U], "chosen": 5, "rejected": [A]},
        "bad_end": {"prompt": [U, A], "chosen": [A], "rejected": [A]},
    },
}

# bad input -> (pattern the message must contain, whether it must name line 2)
EXPECT = {
    "invalid_json": (r"invalid JSON", True),
    "missing_field": (r"missing|expected", True),
    "wrong_type": (r"expected|must be", True),
    "bad_end": (r"must end with", True),
    "empty": (r"empty", False),
    "binary": (r"binary|UTF-8", False),
    "non_utf8": (r"UTF-8", False),
    "missing_path": (r"not found|no such file", False),
    "directory": (r"directory", False),
}


def make_input(tmp: Path, kind: str, bad: str) -> Path:
    """Write the bad file (or pick the bad path) for `kind` and return its path."""
    p = tmp / "input.jsonl"
    good = json.dumps(RECORDS[kind]["good"]) + "\n"
    if bad == "invalid_json":
        p.write_text(good + '{"prompt": "unterminated\n', encoding="utf-8")
    elif bad in ("missing_field", "wrong_type", "bad_end"):
        p.write_text(good + json.dumps(RECORDS[kind][bad]) + "\n", encoding="utf-8")
    elif bad == "empty":
        p.write_bytes(b"")
    elif bad == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif bad == "non_utf8":
        p.write_bytes(b'{"prompt": "caf\xe9 latin-1"}\n')
    elif bad == "missing_path":
        p = tmp / "does-not-exist.jsonl"
    elif bad == "directory":
        p = tmp / "a-directory"
        p.mkdir()
    return p


def _label_prompts(inp, out, tiny):
    return ["label", "--constitution", CONSTITUTION, "--prompts", str(inp), "--out", str(out),
            "--backend", "fake"]


# command -> (file kind, argv builder (input path, out dir, tiny model dir))
COMMANDS = {
    "generate": ("prompts", lambda i, o, m: [
        "generate", "--prompts", str(i), "--out", str(o / "out.jsonl"), "--backend", "fake"]),
    "critique": ("prompts", lambda i, o, m: [
        "critique", "--constitution", CONSTITUTION, "--prompts", str(i), "--out", str(o),
        "--backend", "fake", "--no-progress"]),
    "critique-helpful": ("prompts", lambda i, o, m: [
        "critique", "--constitution", CONSTITUTION, "--prompts", str(GOOD_PROMPTS),
        "--helpful-prompts", str(i), "--out", str(o), "--backend", "fake", "--no-progress"]),
    "label-pairs": ("label_pairs", lambda i, o, m: [
        "label", "--constitution", CONSTITUTION, "--pairs", str(i), "--out", str(o),
        "--backend", "fake"]),
    "label-prompts": ("prompts", _label_prompts),
    "train-sft": ("sft", lambda i, o, m: [
        "train", "sft", "--data", str(i), "--out", str(o), "--model", str(m)]),
    "train-dpo": ("dpo_pairs", lambda i, o, m: [
        "train", "dpo", "--data", str(i), "--out", str(o), "--model", str(m)]),
    "eval": ("eval_prompts", lambda i, o, m: [
        "eval", "--prompts", str(i), "--out", str(o), "--backend", "fake"]),
    "eval-harmful": ("prompts", lambda i, o, m: [
        "eval", "--harmful", str(i), "--out", str(o), "--backend", "fake"]),
}
GOOD_PROMPTS: Path = Path()  # set by the fixture below (critique-helpful needs good prompts)


@pytest.fixture(autouse=True)
def _good_prompts(tmp_path):
    global GOOD_PROMPTS
    GOOD_PROMPTS = tmp_path / "good-prompts.jsonl"
    GOOD_PROMPTS.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and what was printed (stderr, then stdout: `principles lint` reports there)."""
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


def check_error(rc: int, err: str, path: Path, bad: str) -> None:
    pattern, names_line = EXPECT[bad]
    assert rc == 1, f"exit status {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("charter: error:")]
    assert len(lines) == 1, f"expected one error line:\n{err}"
    msg = lines[0]
    where = f"{path}:2" if names_line else str(path)
    assert where in msg, f"message does not name {where}: {msg}"
    assert re.search(pattern, msg, re.IGNORECASE), f"{pattern!r} not in: {msg}"


@pytest.mark.parametrize("bad", list(EXPECT))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_matrix(command, bad, tmp_path, capsys, tiny_model_dir):
    kind, argv = COMMANDS[command]
    inp = make_input(tmp_path, kind, bad)
    rc, err = run_cli(argv(inp, tmp_path / "out", tiny_model_dir), capsys)
    check_error(rc, err, inp, bad)


# -- files that are not JSONL: YAML (principle files, configs, pipeline files), JSON -------------

YAML_BAD = {
    "invalid_yaml": (b"name: x\nprinciples: [unclosed\n", r"YAML|expected", r":[23]\b"),
    "empty": (b"", r"empty|expected|missing", None),
    "binary": (bytes(range(256)) * 4, r"binary|UTF-8|YAML|special characters", None),
    "non_utf8": (b"name: caf\xe9\n", r"UTF-8", None),
    "wrong_type": (b"- just\n- a list\n", r"expected|mapping", None),
}


def _yaml_targets(p: Path, out: Path) -> dict[str, list[str]]:
    return {
        "principles-lint": ["principles", "lint", str(p)],
        "principles-show": ["principles", "show", str(p)],
        "critique-constitution": ["critique", "--constitution", str(p), "--prompts",
                                  str(GOOD_PROMPTS), "--out", str(out), "--backend", "fake"],
        "label-constitution": ["label", "--constitution", str(p), "--pairs", str(GOOD_PROMPTS),
                               "--out", str(out), "--backend", "fake"],
        "run": ["run", str(p), "--out", str(out)],
        "critique-config": ["critique", "--config", str(p), "--constitution", CONSTITUTION,
                            "--prompts", str(GOOD_PROMPTS), "--out", str(out),
                            "--backend", "fake"],
    }


YAML_TARGETS = list(_yaml_targets(Path("x"), Path("o")))


@pytest.mark.parametrize("bad", [*YAML_BAD, "missing_path", "directory"])
@pytest.mark.parametrize("target", YAML_TARGETS)
def test_bad_yaml_files(target, bad, tmp_path, capsys):
    p = tmp_path / "file.yaml"
    if bad == "missing_path":
        p = tmp_path / "nope.yaml"
        pattern, line_re = r"not found|no such file", None
    elif bad == "directory":
        p = tmp_path / "dir.yaml"
        p.mkdir()
        pattern, line_re = r"directory", None
    else:
        content, pattern, line_re = YAML_BAD[bad]
        p.write_bytes(content)
    if bad == "empty" and target == "critique-config":
        return  # an empty --config file sets nothing: valid (flags give every setting)
    rc, text = run_cli(_yaml_targets(p, tmp_path / "out")[target], capsys)
    assert rc == 1, f"exit status {rc}:\n{text}"
    assert "Traceback" not in text, text
    assert str(p) in text, f"does not name {p}:\n{text}"
    assert re.search(pattern, text, re.IGNORECASE), f"{pattern!r} not in:\n{text}"
    if line_re:
        assert re.search(re.escape(str(p)) + line_re, text), f"no line number:\n{text}"


@pytest.mark.parametrize("bad", ["invalid_json", "empty", "binary", "non_utf8", "wrong_type",
                                 "missing_path", "directory"])
def test_bad_conversation_file(bad, tmp_path, capsys):
    """`principles render --conversation FILE` reads one JSON document."""
    p = tmp_path / "conv.json"
    content = {"invalid_json": b'{"messages": [\n  {"role": "user"\n', "empty": b"",
               "binary": bytes(range(256)), "non_utf8": b'{"prompt": "caf\xe9"}',
               "wrong_type": b'{"messages": "hello"}'}
    if bad == "missing_path":
        p = tmp_path / "nope.json"
    elif bad == "directory":
        p.mkdir()
    else:
        p.write_bytes(content[bad])
    rc, err = run_cli(["principles", "render", CONSTITUTION, "--principle", "harm",
                       "--stage", "critique", "--conversation", str(p)], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert str(p) in err, err
    if bad == "invalid_json":
        assert f"{p}:3" in err, err  # the document ends inside the object: line 3


def test_bad_prompt_set_in_pipeline_file(tmp_path, capsys):
    """A prompt set named by a pipeline file is read with the same checks."""
    prompts = tmp_path / "red.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    pf = tmp_path / "pipe.yaml"
    pf.write_text(f"constitution: {CONSTITUTION}\nbackend: fake\n"
                  f"harmful: {{path: {prompts}, eval: 1}}\n")
    rc, err = run_cli(["run", str(pf), "--out", str(tmp_path / "run")], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert f"{prompts}:2" in err, err


# -- --on-error skip: bad records are skipped and counted ---------------------------------------


def _mixed_prompts(tmp: Path) -> Path:
    p = tmp / "mixed.jsonl"
    p.write_text("\n".join([
        json.dumps({"prompt": "first good prompt"}),
        '{"prompt": "torn',
        json.dumps({"prompt": 42}),
        json.dumps({"messages": [U, A]}),
        json.dumps({"prompt": "second good prompt"}),
    ]) + "\n")
    return p


def test_critique_on_error_skip_counts(tmp_path, capsys):
    p = _mixed_prompts(tmp_path)
    out = tmp_path / "crit"
    rc = main(["critique", "--constitution", CONSTITUTION, "--prompts", str(p), "--out",
               str(out), "--backend", "fake", "--no-progress", "--on-error", "skip"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert manifest["counts"]["done"] == 2
    for line in (2, 3, 4):
        assert f"{p}:{line}" in text, f"line {line} not reported in the manifest"


def test_generate_on_error_skip_counts(tmp_path, capsys):
    p = _mixed_prompts(tmp_path)
    out = tmp_path / "answers.jsonl"
    rc = main(["generate", "--prompts", str(p), "--out", str(out), "--backend", "fake",
               "--on-error", "skip"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(out.read_text().splitlines()) == 2
    assert "3 bad records skipped" in err, err


def test_label_on_error_skip_counts(tmp_path, capsys):
    p = tmp_path / "pairs.jsonl"
    good = RECORDS["label_pairs"]["good"]
    p.write_text("\n".join([json.dumps({**good, "id": "one"}), "not json",
                            json.dumps(RECORDS["label_pairs"]["wrong_type"]),
                            json.dumps({**good, "id": "two"})]) + "\n")
    out = tmp_path / "lab"
    rc = main(["label", "--constitution", CONSTITUTION, "--pairs", str(p), "--out", str(out),
               "--backend", "fake", "--on-error", "skip"])
    assert rc == 0, capsys.readouterr().err
    assert len((out / "labels.jsonl").read_text().splitlines()) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["input_errors"]["count"] == 2
    assert f"{p}:2" in report["input_errors"]["first"][0]


def test_debug_shows_traceback_subprocess(tmp_path):
    """Through `python -m charter`: one line without --debug, a traceback with it."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{oops\n')
    cmd = [sys.executable, "-m", "charter", "generate", "--prompts", str(p), "--out",
           str(tmp_path / "o.jsonl"), "--backend", "fake"]
    plain = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr.strip() == (f"charter: error: {p}:2: invalid JSON (Expecting property "
                                    "name enclosed in double quotes at column 2)")
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_eval_on_error_skip_counts(tmp_path, capsys):
    p = tmp_path / "eval.jsonl"
    good = RECORDS["eval_prompts"]["good"]
    p.write_text("\n".join([json.dumps(good), "{broken",
                            json.dumps({"prompt": "Bake bread?", "label": "benign"})]) + "\n")
    out = tmp_path / "ev"
    rc = main(["eval", "--prompts", str(p), "--out", str(out), "--backend", "fake",
               "--on-error", "skip"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["input_errors"]["count"] == 1
    assert f"{p}:2" in report["input_errors"]["first"][0]


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    p = tmp_path / "secret.jsonl"
    p.write_text('{"prompt": "hi"}\n')
    p.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the permission check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k:
                            False if str(path) == str(p) else real(path, mode, *a, **k))
    rc, err = run_cli(["generate", "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"),
                       "--backend", "fake"], capsys)
    assert rc == 1 and f"{p}: prompts file is not readable" in err, err


def test_unexpected_exception_is_one_line_without_debug(tmp_path, capsys, monkeypatch):
    """A bug (not bad input) still prints one line; --debug shows the traceback."""
    import charter.commands.generate as gen

    def boom(cfg, backend=None):
        raise RuntimeError("tensor shapes do not match\nmore detail")

    monkeypatch.setattr(gen, "run_generate", boom)
    argv = ["generate", "--prompts", str(GOOD_PROMPTS), "--out", str(tmp_path / "o.jsonl")]
    rc, err = run_cli(argv, capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip() == ("charter: internal error: RuntimeError: tensor shapes do not match "
                           "(a bug in charter; re-run with --debug for the traceback and "
                           "report it)")
    rc, err = run_cli(["--debug", *argv], capsys)
    assert rc == 1 and "Traceback" in err
