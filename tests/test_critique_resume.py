"""Crash safety of the critique loop (resume, torn last line, no duplicates), the refusal to mix
settings in one output directory, and the `charter critique` command."""

from __future__ import annotations

import json

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from critique.backends.fake import FakeBackend
from critique.revise.run import CritiqueConfig, run_critique

CONSTITUTION = """\
name: resume
description: For resume tests.
principles:
  - id: harm
    critique: "What is harmful in: {{ response }}"
    revision: "Rewrite: {{ response }}"
  - id: rude
    critique: "What is rude in: {{ response }}"
    revision: "Be polite: {{ response }}"
"""


def responder(conv, prefix):
    last = conv[-1]["content"]
    if last.startswith("What is"):
        return f"Critique of {len(conv)} turns: it is bad."
    if last.startswith(("Rewrite", "Be polite")):
        return f"Better answer after {len(conv)} turns."
    return f"First answer to {last}"


class Crash(Exception):
    pass


@pytest.fixture
def setup(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text(CONSTITUTION)
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Prompt {i}"}) + "\n" for i in range(7)))

    def cfg(out="out", **kw):
        kw = {"rounds": 2, "batch_size": 2, "few_shot": 0, **kw}
        return CritiqueConfig(constitution=str(c), prompts=str(p), out=str(tmp_path / out),
                              backend="fake", progress=False, **kw)

    return tmp_path, cfg


def test_resume_after_crash_with_torn_line(setup):
    """Crash in the 3rd chunk (after 2 chunks = 4 records were appended), then a torn half
    line, as a kill mid-write leaves: the re-run keeps the 4 records byte for byte, drops the
    torn line, generates only for the 3 missing prompts, and ends with the same records as an
    uninterrupted run, none twice."""
    tmp_path, cfg = setup
    calls = 0

    def crashing(conv, prefix):
        nonlocal calls
        calls += 1
        if calls > 2 * (2 + 2 * 2 * 2):  # two chunks of 2: initial + 2 rounds x 2 steps each
            raise Crash
        return responder(conv, prefix)

    with pytest.raises(Crash):
        run_critique(cfg(), backend=FakeBackend(crashing))
    records = tmp_path / "out/records.jsonl"
    before = records.read_bytes()
    assert len(before.splitlines()) == 4
    with open(records, "ab") as f:
        f.write(b'{"id": "deadbeef", "prompt": [{"role": "us')

    fake = FakeBackend(responder)
    m = run_critique(cfg(), backend=fake)
    after = records.read_bytes()
    assert after.startswith(before)
    assert b"deadbeef" not in after
    ids = [json.loads(line)["id"] for line in after.splitlines()]
    assert len(ids) == 7 == len(set(ids))
    assert [len(convs) for _, convs in fake.calls] == [2, 2, 2, 2, 2, 1, 1, 1, 1, 1]
    assert m["counts"]["resumed"] == 4 and m["counts"]["new_this_run"] == 3

    run_critique(cfg("fresh"), backend=FakeBackend(responder))
    assert (tmp_path / "fresh/records.jsonl").read_bytes() == after
    assert (tmp_path / "fresh/sft.jsonl").read_bytes() == (tmp_path / "out/sft.jsonl").read_bytes()

    fake.calls.clear()
    again = run_critique(cfg(), backend=fake)
    assert fake.calls == [] and records.read_bytes() == after
    assert again["counts"]["done"] == 7


def test_extending_limit_resumes(setup):
    tmp_path, cfg = setup
    run_critique(cfg(limit=3, batch_size=4), backend=FakeBackend(responder))
    first = (tmp_path / "out/records.jsonl").read_bytes()
    fake = FakeBackend(responder)
    m = run_critique(cfg(limit=5), backend=fake)
    assert (tmp_path / "out/records.jsonl").read_bytes().startswith(first)
    assert fake.calls[0] == ("generate", [[{"role": "user", "content": "Prompt 3"}],
                                          [{"role": "user", "content": "Prompt 4"}]])
    assert m["counts"]["prompts"] == 5 and m["counts"]["resumed"] == 3


@pytest.mark.parametrize("change, message", [
    ({"rounds": 3}, "rounds: 2 → 3"),
    ({"seed": 1}, "seed: 0 → 1"),
    ({"max_new_tokens": 10}, "sampling.max_new_tokens: 256 → 10"),
    ({"few_shot": 1}, "few_shot: 0 → 1"),
])
def test_refuses_to_resume_with_other_settings(setup, change, message):
    tmp_path, cfg = setup
    run_critique(cfg(limit=2), backend=FakeBackend(responder))
    with pytest.raises(CharterError, match="use a new --out") as e:
        run_critique(cfg(limit=2, **change), backend=FakeBackend(responder))
    assert message in str(e.value)


def test_refuses_other_constitution_even_without_manifest(setup):
    tmp_path, cfg = setup
    run_critique(cfg(limit=2), backend=FakeBackend(responder))
    (tmp_path / "c.yaml").write_text(CONSTITUTION.replace("Be polite", "Be kind"))
    with pytest.raises(CharterError, match=r"constitution\.sha256.*use a new --out"):
        run_critique(cfg(limit=2), backend=FakeBackend(responder))
    (tmp_path / "out/manifest.json").unlink()  # as if killed before the manifest was written
    with pytest.raises(CharterError, match="use a new --out"):
        run_critique(cfg(limit=2), backend=FakeBackend(responder))


def test_cli_config_file_and_flags(setup, capsys):
    tmp_path, _ = setup
    conf = tmp_path / "crit.yaml"
    conf.write_text(f"constitution: {tmp_path / 'c.yaml'}\nprompts: {tmp_path / 'p.jsonl'}\n"
                    "backend: fake\nrounds: 3\nlimit: 2\nfew_shot: 0\nprogress: false\n")
    rc = main(["critique", "--config", str(conf), "--rounds", "1", "--out",
               str(tmp_path / "cli")])
    assert rc == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli/manifest.json").read_text())
    c = manifest["counts"]
    assert c["prompts"] == 2 and c["done"] + c["flagged"] == 2
    assert f"critique: {c['done']}/2 prompts done (0 from an earlier run)" in out
    assert f"pairs.jsonl: {c['pairs']} pairs" in out
    assert manifest["config"]["rounds"] == 1 and manifest["config"]["limit"] == 2

    conf.write_text(conf.read_text() + "rounds_typo: 2\n")
    rc = main(["critique", "--config", str(conf), "--out", str(tmp_path / "cli2")])
    assert rc == 1
    assert f"{conf}:8: rounds_typo: unknown config key" in capsys.readouterr().err
    assert main(["critique", "--constitution", str(tmp_path / "c.yaml"), "--backend",
                 "fake"]) == 1
    assert "missing required setting(s): --prompts, --out" in capsys.readouterr().err
