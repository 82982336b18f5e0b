"""Every command that reads a file, against hostile files of every class we know of: each run
ends within 10 s with exit status 1 and one line that names the file, no traceback, no internal
error, and changes nothing outside its output folder.

The matrix is (commands from test_bad_inputs) x (generators below); the generators are
written per class (encoding, compression, CSV quoting, special files, nesting, size), not per
bug, and new classes are one entry. YAML inputs (principle files, pipeline files, --config)
get their own generators.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
import test_bad_inputs as bad
from test_bad_inputs import COMMANDS, RECORDS

from charter.cli import main

LIMIT_S = 10


def _good_line(kind: str) -> bytes:
    return (json.dumps(RECORDS[kind]["good"]) + "\n").encode()


def _with_field(kind: str, text_json: str) -> bytes:
    """The good record with its first string (however deep) replaced by raw JSON `text_json`."""
    def mark(v, done):
        if isinstance(v, str) and not done:
            done.append(1)
            return "@@"
        if isinstance(v, dict):
            return {k: mark(x, done) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x, done) for x in v]
        return v

    good = mark(RECORDS[kind]["good"], [])
    return json.dumps(good).replace('"@@"', text_json, 1).encode() + b"\n"


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _csv_header(kind: str) -> str:
    return ",".join(RECORDS[kind]["good"])


# hostile class -> (file name, bytes of the file given the record kind), or a special path
RECORD_FILES = {
    "lone-surrogate": ("in.jsonl", lambda k: _good_line(k) + _with_field(k, '"a \\ud800 b"')),
    "nul-escape": ("in.jsonl", lambda k: _good_line(k) + _with_field(k, '"a \\u0000 b"')),
    "truncated-gz": ("in.jsonl.gz", lambda k: _half(gzip.compress(_good_line(k) * 2000))),
    "corrupt-gz": ("in.jsonl.gz", lambda k: gzip.compress(_good_line(k) * 50)[:20] + b"\xff" * 64),
    "not-gz": ("in.jsonl.gz", lambda k: _good_line(k)),
    "csv-open-quote": ("in.csv", lambda k: (_csv_header(k) + "\n" + ",".join(
        ['"never closed'] + ["x"] * (_csv_header(k).count(","))) + "\nmore,rows\n").encode()),
    "csv-extra-cells": ("in.csv", lambda k: (_csv_header(k) + "\n" + ",".join(
        ["a"] * (_csv_header(k).count(",") + 3)) + "\n").encode()),
    "deep-nesting": ("in.jsonl", lambda k: _good_line(k) + b"[" * 200_000 + b"]" * 200_000
                     + b"\n"),
    "json-truncated": ("in.json", lambda k: b'[{"prompt": "a"}, {"prompt": "b'),
    "parquet-garbage": ("in.parquet", lambda k: b"PAR1" + os.urandom(200) + b"PAR1"),
    "blank-lines-only": ("in.jsonl", lambda k: b"\n \n\t\n"),
    "dev-zero": ("/dev/zero", None),
    "symlink-loop": ("loop.jsonl", "loop"),
}


def make_record_file(tmp: Path, kind: str, name: str) -> Path:
    fname, content = RECORD_FILES[name]
    if content is None:
        return Path(fname)
    p = tmp / "inputs" / fname
    p.parent.mkdir(exist_ok=True)
    if content == "loop":
        os.symlink(p, p)  # a link to itself: ELOOP
        return p
    p.write_bytes(content(kind))
    return p


def snapshot(root: Path, skip: Path) -> dict[str, bytes | None]:
    """Every path under `root` but `skip` (the output folder), with file bytes."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p == skip or skip in p.parents:
            continue
        snap[str(p)] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return snap


def check_refused(argv: list[str], where: Path, tmp: Path, out: Path, capsys, deadline
                  ) -> None:
    before = snapshot(tmp, out)
    t = time.monotonic()
    with deadline(LIMIT_S):
        rc = main(argv)
    took = time.monotonic() - t
    cap = capsys.readouterr()
    text = cap.err + cap.out
    assert rc == 1, f"exit status {rc}:\n{text}"
    assert took < LIMIT_S
    assert "Traceback" not in text and "internal error" not in text, text
    lines = [ln for ln in text.strip().splitlines() if str(where) in ln]
    assert lines, f"no line names {where}:\n{text}"
    assert cap.err.count("charter: error:") <= 1, text
    after = snapshot(tmp, out)
    # the refused run may leave its (empty) output folder's lock beside an output file only
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)
               and not Path(k).name.startswith(".")}
    assert not changed, f"changed outside the output folder: {sorted(changed)}"


@pytest.fixture(autouse=True)
def _good_prompts(tmp_path):
    bad.GOOD_PROMPTS = tmp_path / "good-prompts.jsonl"
    bad.GOOD_PROMPTS.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")


@pytest.mark.parametrize("hostile", list(RECORD_FILES))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_hostile_record_files(command, hostile, tmp_path, capsys, tiny_model_dir, deadline):
    kind, argv = COMMANDS[command]
    inp = make_record_file(tmp_path, kind, hostile)
    out = tmp_path / "out"
    check_refused(argv(inp, out, tiny_model_dir), inp, tmp_path, out, capsys, deadline)


# -- YAML: principle files, pipeline files, --config --------------------------------------------

YAML_FILES = {
    "lone-surrogate": b'name: "a \\ud800"\ndescription: d\nprinciples: []\n',
    "nul-escape": b'name: "a \\0 b"\ndescription: d\nprinciples: []\n',
    "duplicate-key": b"name: a\nname: b\ndescription: d\n",
    "python-tag": b"name: !!python/object/apply:os.system ['true']\n",
    "alias-bomb": b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n" % ((c, c) + (c - 1,) * 9)
        for c in range(ord("b"), ord("k"))) + b"name: *j\n",
    "deep-nesting": b"name: " + b"[" * 1_000 + b"]" * 1_000 + b"\n",
    "over-1mb": b"name: x\ndescription: '" + b"y" * 1_100_000 + b"'\n",
    "template-bomb": (b"name: x\ndescription: d\nprinciples:\n  - id: a\n    preference: "
                      b"\"{{ ([[0] * 100000] * 100000)|sum(start=[]) }}\"\n"),
    "dev-zero": None,
}


@pytest.mark.parametrize("hostile", list(YAML_FILES))
@pytest.mark.parametrize("target", bad.YAML_TARGETS)
def test_hostile_yaml_files(target, hostile, tmp_path, capsys, deadline):
    content = YAML_FILES[hostile]
    p = Path("/dev/zero") if content is None else tmp_path / "file.yaml"
    if content is not None:
        p.write_bytes(content)
    if hostile == "template-bomb" and target in ("run", "critique-config"):
        return  # not a principle file there: an unknown key, covered by the others
    out = tmp_path / "out"
    check_refused(bad._yaml_targets(p, out)[target], p, tmp_path, out, capsys, deadline)


def test_endless_fifo_stops_at_the_cap_and_the_flag_raises_it(tmp_path, capsys, deadline):
    """A FIFO whose writer never stops (`<(yes ...)`) is read up to --max-input-mb, then
    refused; a finite FIFO is read like a file."""
    import threading

    fifo = tmp_path / "prompts.jsonl"
    line = _good_line("prompts")

    def feed(n: int | None):
        try:
            with open(fifo, "wb") as f:
                i = 0
                while n is None or i < n:
                    f.write(line)
                    i += 1
        except (BrokenPipeError, OSError):
            pass  # the reader stopped reading

    out = tmp_path / "o.jsonl"
    argv = ["--max-input-mb", "1", "generate", "--prompts", str(fifo), "--out", str(out),
            "--backend", "fake"]
    for n, rc, text in ((None, 1, "larger than the cap of 1 MB; raise it with --max-input-mb"),
                        (3, 0, "wrote 1 responses")):
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)
        t = threading.Thread(target=feed, args=(n,), daemon=True)
        t.start()
        with deadline(LIMIT_S):
            assert main(argv) == rc
        t.join(5)
        assert text in capsys.readouterr().err
