"""A server that fails for good in the middle of a run loses no finished work.

tests/test_openai_backend.py covers each fault alone (refused connections, 429 with
Retry-After, 500/502/503, timeouts, truncated and non-JSON bodies, dropped connections, the
retry limit and its message). Here the faults hit whole runs: the stub answers the first
requests, then returns 500 to every request; the command must stop with one clear line naming
the server, keep every record appended before the failure, and the re-run (server back) must
finish the rest without redoing or duplicating any of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.cli import main
from tests.test_openai_backend import Stub

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = str(ROOT / "principles" / "harmless.yaml")


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.shutdown()
    s.server_close()


def _prompts(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(n)))
    return p


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_generate_server_dies_midway_then_resumes(stub, tmp_path, capsys):
    prompts = _prompts(tmp_path, 8)
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--prompts", str(prompts), "--out", str(out), "--backend", "openai",
            "--base-url", stub.url, "--model", "stub-model", "--batch-size", "2",
            "--max-retries", "1", "--concurrency", "1"]
    stub.script = ["ok"] * 4 + [500] * 100  # two batches answered, then the server breaks
    assert main(argv) == 1
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("charter")]  # not progress bars
    assert len(err) == 1 and err[0].startswith("charter: error:"), text
    assert "Traceback" not in text
    assert stub.url.split("/v1")[0] in err[0] and "500" in err[0], err[0]
    first = _lines(out)
    assert len(first) == 4  # the finished batches survived
    stub.script = []  # the server is back
    assert main(argv) == 0
    final = _lines(out)
    assert final[:4] == first  # byte-identical, not redone
    ids = [json.loads(x)["id"] for x in final]
    assert len(ids) == 8 == len(set(ids))


def test_critique_server_dies_midway_then_resumes(stub, tmp_path, capsys):
    prompts = _prompts(tmp_path, 6)
    out = tmp_path / "crit"
    cfg = tmp_path / "critique.yaml"  # server settings through backend_options (YAML)
    cfg.write_text(f"backend_options: {{base_url: {stub.url}, max_retries: 1, backoff: 0.01, "
                   "progress: false}\n")
    argv = ["critique", "--config", str(cfg), "--constitution", CONSTITUTION, "--prompts",
            str(prompts), "--out", str(out), "--backend", "openai", "--model", "stub-model",
            "--batch-size", "2", "--rounds", "1", "--no-progress"]
    # one chunk of 2 prompts = 2 initial + 2 critiques + 2 revisions = 6 requests
    stub.script = ["ok"] * 6 + [503] * 200
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "503" in err, err
    first = _lines(out / "records.jsonl")
    assert len(first) == 2
    stub.script = []
    assert main(argv) == 0
    final = _lines(out / "records.jsonl")
    assert final[:2] == first
    assert len({json.loads(x)["id"] for x in final}) == len(final) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["resumed"] == 2 and manifest["counts"]["prompts"] == 6
