"""Checkpoints and run folders: no pickle, manifests with checksums, damaged ones explained,
run folders identified by content, corrupt run files reported on one line."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from charter.cli import main
from charter.core.errors import CharterError
from charter.core.safestate import load_state, safetensors_pieces, state_bytes
from charter.core.writable import nbytes, write_bytes_durable
from training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("charter", "constitution", "critique", "training")


def test_no_pickle_loading_in_the_packages():
    """Every torch.load passes weights_only=True; nothing imports pickle (or its relatives)."""
    bad = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            text = f.read_text(encoding="utf-8")
            for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
                if "weights_only=True" not in m.group(0):
                    bad.append(f"{f.relative_to(ROOT)}: {m.group(0)[:60]}")
            for m in re.finditer(r"^\s*(?:import|from)\s+(pickle|cPickle|dill|joblib|shelve|"
                                 r"marshal)\b", text, re.MULTILINE):
                bad.append(f"{f.relative_to(ROOT)}: imports {m.group(1)}")
            if re.search(r"\bpickle\.loads?\(|numpy\.load\(.*allow_pickle=True", text):
                bad.append(f"{f.relative_to(ROOT)}: unpickles")
    assert not bad, "\n".join(bad)


def test_grep_finds_an_unsafe_load(tmp_path):
    """The pattern above catches what it is meant to (so the test can fail)."""
    text = 'x = torch.load(path, map_location="cpu")\ny = torch.load(p, weights_only=True)\n'
    found = [m.group(0) for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text)
             if "weights_only=True" not in m.group(0)]
    assert found == ['torch.load(path, map_location="cpu")']


def test_state_round_trip_without_pickle(tmp_path):
    """Optimizer-, scheduler- and RNG-shaped state comes back equal, types included."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "py": random.getstate(), "torch": torch.get_rng_state(),
             "none": None, "inf": float("inf"), "nested": [{"a": (1, 2.5, "x")}]}
    f = tmp_path / "s.safetensors"
    f.write_bytes(state_bytes(state))
    back = load_state(f)
    assert back["py"] == state["py"] and isinstance(back["py"], tuple)
    assert torch.equal(back["torch"], state["torch"])
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]
    assert set(back["opt"]["state"]) == {0, 1}  # int keys stay ints
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert back["nested"] == [{"a": (1, 2.5, "x")}] and back["inf"] == float("inf")
    opt.load_state_dict(back["opt"])  # torch accepts it


def test_state_files_are_written_from_the_tensors_own_memory(tmp_path):
    """`safetensors_pieces` gives the bytes safetensors' own writer gives (every dtype we store,
    a 0-dim and an empty tensor, metadata), and its tensor pieces are views of the tensors, not
    copies: a checkpoint adds nothing of its size to the run's peak memory."""
    from safetensors.torch import load_file, save

    tensors = {"w": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.bfloat16),
               "step": torch.tensor(7.0), "mask": torch.tensor([True, False]),
               "ids": torch.arange(5), "h": torch.ones(2, dtype=torch.float16),
               "empty": torch.zeros(0, 3)}
    pieces = safetensors_pieces(tensors, {"k": "v"})
    assert b"".join(pieces) == save(tensors, metadata={"k": "v"})
    views = {memoryview(p).obj.__array_interface__["data"][0] for p in pieces[2:]
             if memoryview(p).nbytes}
    assert views == {t.data_ptr() for t in tensors.values() if t.numel()}
    write_bytes_durable(tmp_path / "t.safetensors", pieces)
    assert nbytes(pieces) == (tmp_path / "t.safetensors").stat().st_size
    back = load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("content", [b"", b"\x00" * 16, b"PK\x03\x04 a zip, not safetensors",
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}"])
def test_damaged_state_file_is_one_clear_error(tmp_path, content):
    f = tmp_path / "optimizer.safetensors"
    f.write_bytes(content)
    with pytest.raises(CharterError, match=r"optimizer\.safetensors: damaged state file"):
        load_state(f)


def _fake_checkpoint(out: Path, step: int) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(state_bytes({"w": torch.ones(2)}))
    (d / "train_config.json").write_text("{}")
    checkpoint.write_manifest(d, step)
    return d


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "model.safetensors").write_bytes(b"x" * 5), r"has 5 bytes"),
    (lambda d: (d / "model.safetensors").write_bytes(
        bytes(len((d / "model.safetensors").read_bytes()))), r"does not match its checksum"),
    (lambda d: (d / "model.safetensors").unlink(), r"model.safetensors is missing"),
    (lambda d: (d / "manifest.json").write_text(""), r"manifest.json is damaged"),
    (lambda d: (d / "manifest.json").unlink(), r"not completely written"),
    (lambda d: ((d / "manifest.json").unlink(), (d / "state.json").write_text("{}")),
     r"older Charter in pickle format"),
])
def test_resume_skips_a_damaged_checkpoint_and_says_why(tmp_path, damage, why):
    _fake_checkpoint(tmp_path, 2)
    damage(_fake_checkpoint(tmp_path, 4))
    said = []
    assert checkpoint.resume_point(tmp_path, said.append) == tmp_path / "checkpoint-2"
    assert len(said) == 1 and re.search(rf"checkpoint-4 is damaged: .*{why}", said[0]), said


def test_only_damaged_checkpoints_stop_the_run(tmp_path):
    (_fake_checkpoint(tmp_path, 3) / "model.safetensors").write_bytes(b"")
    with pytest.raises(CharterError, match=r"no intact checkpoint to resume from .*checkpoint-3"):
        checkpoint.resume_point(tmp_path, print)


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_damaged_train_config_is_one_clear_error(tmp_path, content):
    (tmp_path / "train_config.json").write_bytes(content)
    with pytest.raises(CharterError, match=r"train_config\.json: .*damaged"):
        checkpoint.check_run_dir(tmp_path, {"data": "d.jsonl", "out": str(tmp_path)}, "sft")


def test_run_folder_is_identified_by_content_not_path_spelling(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\n')
    out = tmp_path / "run"
    out.mkdir()
    cfg = {"data": str(data), "out": str(out), "lr": 0.1}
    checkpoint.prepare_run_dir(_Acc(), out, cfg, "sft")
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(data, copy)
    # relative spellings, a moved folder and a copy of the data: the same run
    checkpoint.check_run_dir(Path("elsewhere"), {"data": "copy.jsonl", "out": "elsewhere",
                                                 "lr": 0.1}, "sft")
    copy.write_text('{"messages": ["other data"]}\n')
    with pytest.raises(CharterError, match="other settings .*data"):
        checkpoint.check_run_dir(moved, {"data": "copy.jsonl", "out": "x", "lr": 0.1}, "sft")
    with pytest.raises(CharterError, match="other settings .*lr"):
        checkpoint.check_run_dir(moved, {"data": str(data), "out": "x", "lr": 0.2}, "sft")


class _Acc:
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass


def test_moved_run_folder_resumes_via_cli(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Train 2 steps, drop final/, move the folder, re-run with a relative --out: it resumes."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]})
        + "\n" for i in range(4)))
    argv = ["train", "sft", "--data", str(data), "--model", str(tiny_model_dir),
            "--batch-size", "2", "--save-every", "1"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--max-steps", "2"]) == 0
    shutil.rmtree(tmp_path / "a" / "final")
    os.rename(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([*argv, "--out", "b", "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"resuming from b/checkpoint-1 \(step 1 of 2\)", err), err
