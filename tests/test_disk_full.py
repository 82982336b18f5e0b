"""Unwritable outputs fail before work starts; a disk that fills up mid-run corrupts nothing.

Tests run as root in CI, where chmod does not stop writes, so unwritable outputs are made the
ways root cannot write either: a path under a regular file (`--out notes.txt/run`) and a path in
/proc. A full disk is an OSError(ENOSPC) injected into the writes themselves.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

from charter.cli import main
from charter.core.errors import CharterError

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = str(ROOT / "principles" / "harmless.yaml")
U = {"role": "user", "content": "How do I pick a lock?"}
A = {"role": "assistant", "content": "I can't help with that."}


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    files = {
        "prompts": [{"prompt": f"Question {i}?", "label": "harmful"} for i in range(4)],
        "pairs": [{"prompt": "Q?", "response_a": "a", "response_b": "b"}],
        "sft": [{"messages": [U, A]}] * 4,
        "dpo": [{"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant",
                                                             "content": "Sure."}]}] * 4,
    }
    out = {}
    for name, rows in files.items():
        out[name] = tmp_path / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(f"constitution: {CONSTITUTION}\nbackend: fake\n"
                    f"harmful: {{path: {out['prompts']}, eval: 1}}\n")
    out["pipeline"] = pipe
    return out


def _argv(command: str, out: Path, i: dict[str, Path], model: Path) -> list[str]:
    return {
        "generate": ["generate", "--prompts", str(i["prompts"]), "--out", str(out),
                     "--backend", "fake"],
        "critique": ["critique", "--constitution", CONSTITUTION, "--prompts",
                     str(i["prompts"]), "--out", str(out), "--backend", "fake"],
        "label": ["label", "--constitution", CONSTITUTION, "--pairs", str(i["pairs"]),
                  "--out", str(out), "--backend", "fake"],
        "eval": ["eval", "--prompts", str(i["prompts"]), "--out", str(out), "--backend",
                 "fake"],
        "train-sft": ["train", "sft", "--data", str(i["sft"]), "--out", str(out), "--model",
                      str(model)],
        "train-dpo": ["train", "dpo", "--data", str(i["dpo"]), "--out", str(out), "--model",
                      str(model)],
        "run": ["run", str(i["pipeline"]), "--out", str(out)],
    }[command]


COMMANDS = ["generate", "critique", "label", "eval", "train-sft", "train-dpo", "run"]


@pytest.mark.parametrize("where", ["under_a_file", "proc", "is_a_file"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_fails_before_work(command, where, tmp_path, inputs, capsys,
                                             monkeypatch, tiny_model_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("a regular file\n")
    out = {"under_a_file": notes / "run", "proc": Path("/proc/charter-test/run"),
           "is_a_file": notes}[where]
    if command == "generate" and where == "is_a_file":
        out = tmp_path  # generate writes a file: a directory is the wrong kind here

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the output was checked")

    import training.stage

    monkeypatch.setattr(training.stage, "setup", no_model)  # the name SFT and DPO call
    monkeypatch.setattr("critique.backends.load_backend", no_model)
    rc = main(_argv(command, out, inputs, tiny_model_dir))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("charter")]
    assert rc == 1 and "Traceback" not in err, err
    assert len(lines) == 1 and str(out) in lines[0], err
    assert any(s in lines[0] for s in ("cannot write", "found a file", "found a directory")), err
    assert notes.read_text() == "a regular file\n"


def test_no_free_space_is_refused(tmp_path, monkeypatch):
    import shutil as _shutil

    from charter.core.writable import check_output

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr("charter.core.writable.shutil.disk_usage",
                        lambda p: usage._replace(free=4096))
    with pytest.raises(CharterError, match="only 4096 bytes free"):
        check_output(tmp_path / "run")


class FullDisk:
    """A file whose writes succeed `budget` times, then write half the bytes and raise
    ENOSPC, as a write on a full disk does."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data):
        if self.budget <= 0:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= 1
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_mid_critique_keeps_whole_records(tmp_path, monkeypatch, capsys):
    from charter.core.records import JsonlAppender

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n"
                               for i in range(8)))

    def argv(out):
        return ["critique", "--constitution", CONSTITUTION, "--prompts", str(prompts),
                "--out", str(out), "--backend", "fake", "--batch-size", "2", "--no-progress"]

    assert main(argv(tmp_path / "ref")) == 0
    real_init = JsonlAppender.__init__

    def init(self, path):
        real_init(self, path)
        if self.path.name == "records.jsonl":
            self._f = FullDisk(self._f, budget=3)

    monkeypatch.setattr(JsonlAppender, "__init__", init)
    out = tmp_path / "run"
    assert main(argv(out)) == 1
    err = capsys.readouterr().err
    assert f"{out / 'records.jsonl'}: cannot append a record (No space left on device)" in err
    data = (out / "records.jsonl").read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == 3  # no half line left behind
    monkeypatch.setattr(JsonlAppender, "__init__", real_init)  # space freed
    assert main(argv(out)) == 0
    final = (out / "records.jsonl").read_bytes()
    assert final.startswith(data)
    assert final == (tmp_path / "ref" / "records.jsonl").read_bytes()


def test_disk_full_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    from charter.core import records

    target = tmp_path / "manifest.json"
    records.write_json_atomic(target, {"version": 1})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", fsync)
    with pytest.raises(CharterError, match="manifest.json: cannot write .No space left"):
        records.write_json_atomic(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_disk_full_while_checkpointing_then_resume(tmp_path, monkeypatch, capsys,
                                                   tiny_model_dir, inputs):
    """The disk fills up while the third checkpoint is written: one error line naming the
    checkpoint and the space needed; nothing half-written is left; the re-run resumes from the
    last complete one."""
    from training import checkpoint

    real_write = checkpoint.write_bytes_durable

    def write(path, data):
        if "checkpoint-3" in str(path) and "optimizer" in str(path):
            data = b"".join(data)  # the file's pieces
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # half the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(checkpoint, "write_bytes_durable", write)
    out = tmp_path / "sft"
    argv = ["train", "sft", "--data", str(inputs["sft"]), "--out", str(out), "--model",
            str(tiny_model_dir), "--batch-size", "1", "--max-steps", "4", "--save-every", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("charter: error:") == 1, err
    assert re.search(r"checkpoint-3: cannot write: No space left on device; needs about "
                     r"[\d.]+ MB, [\d.]+ MB free", err), err
    assert not (out / ".checkpoint-3.tmp").exists() and not (out / "checkpoint-3").exists()
    monkeypatch.setattr(checkpoint, "write_bytes_durable", real_write)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-2 (step 2" in err, err
    assert not (out / ".checkpoint-3.tmp").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")


def test_a_library_disk_full_error_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """torch/safetensors wrap ENOSPC in a RuntimeError (`[enforce fail at
    inline_container.cc...] ... No space left on device`): not an internal error, the output
    path and the reason."""
    import charter.commands.generate as gen

    def full(cfg, backend=None):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs "
                           "0: No space left on device")

    monkeypatch.setattr(gen, "run_generate", full)
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--prompts", str(out), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"charter: error: {out}: cannot write: No space left on device", err
