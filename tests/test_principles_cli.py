"""`charter principles lint|show|render`: exit codes and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.cli import main

ROOT = Path(__file__).parent.parent
HARMLESS = str(ROOT / "principles" / "harmless.yaml")
SMALL = """\
name: small
description: Two principles.
principles:
  - id: kind
    tags: [tone]
    critique: "Is {{ response }} unkind? ({{ prompt }})"
    revision: "Make it kind: {{ critique }}"
    preference: Which is kinder?
  - id: short
    preference: Which is shorter?
few_shot:
  - {principle: kind, prompt: p, response: r, critique: c, revision: v}
"""


@pytest.fixture
def small(tmp_path) -> str:
    p = tmp_path / "small.yaml"
    p.write_text(SMALL, encoding="utf-8")
    return str(p)


def test_lint_ok(capsys, small):
    assert main(["principles", "lint", small]) == 0
    assert capsys.readouterr().out == (
        f"{small}: ok (2 principles: 1 critique/revision, 2 preference; 1 few-shot, "
        "0 label few-shot)\n")


def test_lint_every_shipped_file(capsys):
    files = sorted(str(p) for p in (ROOT / "principles").glob("*.yaml"))
    assert main(["principles", "lint", *files]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == len(files)
    assert f"{HARMLESS}: ok (16 principles: 14 critique/revision, 16 preference; 6 few-shot" in out


def test_lint_reports_each_bad_file_and_fails(capsys, small, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL.replace("{{ response }}", "{{ respnse }}"), encoding="utf-8")
    assert main(["principles", "lint", small, str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{small}: ok")
    assert out[1] == (f"{bad}:6: principles[0].critique: principle 'kind': undefined variable: "
                      "'respnse' is undefined")
    assert out[2] == "1 of 2 files failed"


def test_lint_missing_file(capsys, tmp_path):
    assert main(["principles", "lint", str(tmp_path / "x.yaml")]) == 1
    assert "x.yaml: principle file not found" in capsys.readouterr().out


def test_show(capsys, small):
    assert main(["principles", "show", small]) == 0
    out = capsys.readouterr().out
    assert "name:        small\n" in out and "description: Two principles.\n" in out
    assert "counts:      2 principles: 1 critique/revision, 2 preference" in out
    lines = out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("ID"))
    assert lines[header + 1].split() == ["kind", "critique,revision,preference", "tone", "-"]
    assert lines[header + 2].split() == ["short", "preference", "-", "-"]
    import hashlib
    assert hashlib.sha256(SMALL.encode()).hexdigest() in out


def test_render_critique_on_sample(capsys, small):
    assert main(["principles", "render", small, "--principle", "kind", "--stage",
                 "critique"]) == 0
    assert capsys.readouterr().out == (
        "Is Check under the doormat for a spare key, or slide a card into the latch. unkind? "
        "(How do I get into my neighbour's house while they are away?)\n")


def test_render_revision_from_conversation_file(capsys, small, tmp_path):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"prompt": "Hi", "response": "Go away.",
                                "critique": "Yes, it is rude."}))
    assert main(["principles", "render", small, "--principle", "kind", "--stage", "revision",
                 "--conversation", str(conv)]) == 0
    assert capsys.readouterr().out == "Make it kind: Yes, it is rude.\n"


def test_render_message_list_takes_last_assistant_as_response(capsys, small, tmp_path):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Go away."}]))
    assert main(["principles", "render", small, "--principle", "kind", "--stage", "critique",
                 "--conversation", str(conv)]) == 0
    assert capsys.readouterr().out == "Is Go away. unkind? (Hi)\n"


def test_render_preference_shows_label_template(capsys, small, tmp_path):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                "options": ["Hello!", "Go away."]}))
    assert main(["principles", "render", small, "--principle", "short", "--stage",
                 "preference", "--conversation", str(conv)]) == 0
    assert capsys.readouterr().out == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: Hi\n\nWhich is shorter?\n\nOptions:\n(A) Hello!\n(B) Go away.\n\n"
        "Answer with the letter of the better option.\n")


@pytest.mark.parametrize("args, message", [
    (["--principle", "nope", "--stage", "critique"], "no principle with id 'nope'"),
    (["--principle", "short", "--stage", "critique"], "'short' has no critique template"),
])
def test_render_errors(capsys, small, args, message):
    assert main(["principles", "render", small, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"charter: error: {small}") and message in err


@pytest.mark.parametrize("content, message", [
    ("{bad json", "conv.json:1: invalid JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role: role must be"),
    ('{"prompt": "x", "colour": 1}', "colour: unknown key 'colour'"),
    ('{"prompt": "x", "options": ["a"]}', "options: expected a list of two strings"),
    ("42", "expected a message list or an object"),
])
def test_render_bad_conversation_file(capsys, small, tmp_path, content, message):
    conv = tmp_path / "conv.json"
    conv.write_text(content)
    assert main(["principles", "render", small, "--principle", "kind", "--stage", "critique",
                 "--conversation", str(conv)]) == 1
    assert message in capsys.readouterr().err
