"""One writer per output: a second writer is refused naming the first (a real second process),
a lock left by a killed process is taken over, and `generate` refuses an output made with other
settings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError
from charter.core.runlock import lock_output, release_all

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = str(ROOT / "principles" / "harmless.yaml")


def _holder(target: Path, is_dir: bool) -> subprocess.Popen:
    """Another process that takes the lock on `target` and keeps it until killed."""
    code = ("import sys, time; sys.argv = ['x', 'critique', '--out', 'elsewhere']\n"
            "from charter.core.runlock import lock_output\n"
            f"lock_output({str(target)!r}, is_dir={is_dir})\n"
            "print('locked', flush=True); time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.fixture
def prompts(tmp_path) -> Path:
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    return p


@pytest.mark.parametrize("command", ["critique", "generate"])
def test_second_writer_is_refused_then_takes_over_a_dead_lock(command, tmp_path, prompts,
                                                              capsys):
    out = tmp_path / ("crit" if command == "critique" else "answers.jsonl")
    if command == "critique":
        out.mkdir()
        argv = ["critique", "--constitution", CONSTITUTION, "--prompts", str(prompts),
                "--out", str(out), "--backend", "fake", "--no-progress"]
    else:
        argv = ["generate", "--prompts", str(prompts), "--out", str(out), "--backend", "fake"]
    first = _holder(out, is_dir=command == "critique")
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{out}: out: in use by another charter process (pid {first.pid} on host " \
               f"{socket.gethostname()}, `charter critique --out elsewhere`" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (out / "records.jsonl").exists() and not (
            out.parent / "answers.jsonl").exists(), "the refused run wrote something"
    finally:
        first.kill()
        first.wait()
    assert main(argv) == 0  # the holder is dead: its lock is free
    err = capsys.readouterr().err
    assert f"taking over the lock of a charter process that is gone (pid {first.pid}" in err


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    lock_output(tmp_path)
    lock_output(tmp_path)  # the pipeline and the stage it runs share it
    release_all()
    p = _holder(tmp_path, True)  # free again for another process
    try:
        with pytest.raises(CharterError, match=f"pid {p.pid}"):
            lock_output(tmp_path)
    finally:
        p.kill()
        p.wait()


def test_generate_refuses_an_output_made_with_other_settings(tmp_path, prompts, capsys):
    out = tmp_path / "a.jsonl"
    base = ["generate", "--prompts", str(prompts), "--out", str(out), "--backend", "fake"]
    assert main(base) == 0
    before = out.read_bytes()
    assert main([*base, "--temperature", "0.7", "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "this file holds responses made with other settings (seed: 0 → 3; temperature: 0.0 → 0.7)" in err, err
    assert out.read_bytes() == before
    assert main(base) == 0  # the same settings resume (nothing left to do)
    plain = tmp_path / "old.jsonl"
    plain.write_text(out.read_text())  # records without their settings file
    assert main([*base[:4], str(plain), *base[5:]]) == 1
    assert "made with unknown settings" in capsys.readouterr().err
