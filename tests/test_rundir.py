"""The run-folder guard (`charter.core.rundir`) that every stage and `charter run` use."""

from __future__ import annotations

import json

import pytest

from charter.core.errors import CharterError
from charter.core.rundir import RunFolder, differences, fingerprint, read_state, same_place


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({})) == 16


def test_differences_nested_dotted_and_options():
    """old {seed 0, sampling {t .8, n 4}, gone 1} vs new {seed 1, sampling {t .8, n 2}, added 3}:
    seed, sampling.n, gone (old only) and added (new only) differ; with defaults {added: 3} the
    added key at its default is no difference; current_only drops `gone`; ignore drops seed;
    same() accepting `seed` drops it."""
    old = {"seed": 0, "sampling": {"t": 0.8, "n": 4}, "gone": 1}
    new = {"seed": 1, "sampling": {"t": 0.8, "n": 2}, "added": 3}
    assert differences(old, new) == ["added: None → 3", "gone: 1 → None",
                                     "sampling.n: 4 → 2", "seed: 0 → 1"]
    assert differences(old, new, defaults={"added": 3}) == [
        "gone: 1 → None", "sampling.n: 4 → 2", "seed: 0 → 1"]
    assert differences(old, new, current_only=True, ignore={"seed"}) == [
        "added: None → 3", "sampling.n: 4 → 2"]
    assert differences(old, new, same=lambda k, a, b: k == "seed", defaults={"added": 3},
                       current_only=True) == ["sampling.n: 4 → 2"]
    assert differences(old, dict(old)) == []


def test_matching_settings_resume_and_a_fresh_folder_records(tmp_path):
    guard = RunFolder(tmp_path / "run", what="labels")
    guard.check({"seed": 0})  # nothing recorded: a fresh folder
    guard.claim()
    guard.record({"settings": {"seed": 0, "model": "m"}, "config": {"out": "x"}})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["seed"] == 0
    guard.check({"model": "m", "seed": 0})  # the same settings: resume, no error
    assert guard.stored() == {"seed": 0, "model": "m"}


def test_mismatch_is_refused_naming_the_folder_and_each_setting(tmp_path):
    folder = tmp_path / "run"
    guard = RunFolder(folder, what="labels")
    guard.record({"settings": {"seed": 0, "model": "m", "few_shot": 1}})
    with pytest.raises(CharterError) as e:
        guard.check({"seed": 1, "model": "m", "few_shot": 0})
    msg = str(e.value)
    assert msg.startswith(f"{folder}: out: this folder holds labels made with other settings")
    assert "(few_shot: 1 → 0; seed: 0 → 1)" in msg
    assert f"delete {folder} to start over, or use a new --out" in msg
    assert "\n" not in msg


def test_many_differences_are_cut_short(tmp_path):
    guard = RunFolder(tmp_path)
    old = {f"k{i}": i for i in range(12)}
    err = guard.refusal(differences(old, {k: -1 for k in old}))
    assert "; and 4 more" in str(err) and "k0: 0 → -1" in str(err)


@pytest.mark.parametrize("content, why", [
    (b"", "JSONDecodeError"), (b'{"settings": {"seed": ', "JSONDecodeError"),
    (b"[1, 2]", "expected a JSON object, got list"), (b"\xff\xfe{}", "UnicodeDecodeError"),
])
def test_torn_or_garbled_state_file_is_one_clear_error(tmp_path, content, why):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CharterError) as e:
        RunFolder(tmp_path).check({"seed": 0})
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'config.json'}: config.json (this folder's settings) "
                          "is damaged or empty")
    assert why in msg and f"delete {tmp_path} to start over" in msg and "\n" not in msg


def test_settings_that_are_not_a_mapping_are_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"settings": [1]}')
    with pytest.raises(CharterError, match=r"config\.json .*damaged: `settings` is not a "
                                           r"mapping"):
        RunFolder(tmp_path).check({"seed": 0})


def test_a_stage_that_may_run_again_reads_a_torn_state_file_as_nothing(tmp_path):
    (tmp_path / "DONE.json").write_text('{"config": {"a"')
    guard = RunFolder(tmp_path, state="DONE.json", key="config", on_damage="ignore")
    assert guard.read() is None and guard.stored() is None
    guard.check({"a": 1})  # nothing to compare: the stage runs again
    assert read_state(tmp_path / "missing.json") is None


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(CharterError, match="output must be a directory, found a file"):
        RunFolder(tmp_path / "out").check({})


def test_same_place_compares_paths_relative_to_a_moved_folder(tmp_path):
    """Recorded for /t/a/eval: model /t/a/dpo (inside the run), base /t/m (outside). Now for
    /t/b/eval: /t/b/dpo is the same place (../dpo), /t/m the same absolute path; /t/b/sft, a
    changed outside path, and a key that is not a path setting are differences. Lists
    compare item by item."""
    a, b = tmp_path / "a", tmp_path / "b"
    same = same_place(a / "eval", b / "eval", {"model", "base", "metrics"})
    old = {"model": str(a / "dpo"), "base": str(tmp_path / "m"), "metrics": [str(a / "dpo")],
           "out": str(a / "eval")}
    assert differences(old, {"model": str(b / "dpo"), "base": str(tmp_path / "m"),
                             "metrics": [str(b / "dpo")], "out": str(a / "eval")},
                       same=same) == []
    new = {"model": str(b / "sft"), "base": str(tmp_path / "n"),
           "metrics": [str(b / "dpo"), str(b / "sft")], "out": str(b / "eval")}
    assert [d.split(":")[0] for d in differences(old, new, same=same)] == [
        "base", "metrics", "model", "out"]
    # nothing recorded about the old folder: only the same absolute path is the same place
    assert not same_place(None, b / "eval", {"model"})("model", str(a / "dpo"), str(b / "dpo"))
