"""benchmarks/quickstart_profile.py: the arithmetic it counts per stage, worked out by hand on a
run folder written here."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prof():
    spec = importlib.util.spec_from_file_location("quickstart_profile",
                                                  ROOT / "benchmarks" / "quickstart_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_stage_work_by_hand(tmp_path, prof):
    N = 1000
    write(tmp_path / "critique/manifest.json", {"backend_usage": {
        "prompt_tokens": 500, "reused_prompt_tokens": 100, "generated_tokens": 300}})
    # two logged steps: 100 tokens/s x 2 s + 50 x 4 = 400 trained tokens
    metrics = "\n".join(json.dumps(r) for r in (
        {"step": 1, "tokens_per_s": 100.0, "elapsed_s": 2.0},
        {"step": 2, "tokens_per_s": 50.0, "elapsed_s": 4.0}))
    for st, ckpt, prec in (("sft", True, "bf16-mixed"), ("dpo", False, "fp32")):
        write(tmp_path / st / "metrics.jsonl", metrics)
        write(tmp_path / st / "train_config.json",
              {"gradient_checkpointing": ckpt, "precision": prec})
    write(tmp_path / "label/report.json", {"usage": {
        "policy": {"prompt_tokens": 200, "reused_prompt_tokens": 50, "generated_tokens": 100},
        "labeler": {"scored_tokens": 1000, "shared_score_tokens": 400}}})
    write(tmp_path / "eval/report.json", {"work": {
        "generate model": {"prompt_tokens": 80, "generated_tokens": 20},
        "judge pairs": {"scored_tokens": 300, "shared_score_tokens": 100}}})

    def work(kind):
        return prof.stage_work(tmp_path, {"kind": kind, "dir": kind}, N)

    assert work("critique")[:2] == (2 * N * (500 - 100 + 300) / 1e9, "fp32")
    assert work("sft")[:2] == (8 * N * 400 / 1e9, "bf16")  # checkpointing: one more forward
    assert work("dpo")[:2] == ((6 * N * 400 + 2 * N * 400) / 1e9, "fp32")  # + reference pass
    assert work("label")[0] == 2 * N * ((200 - 50 + 100) + (1000 - 400)) / 1e9
    assert work("eval")[0] == 2 * N * (100 + 200) / 1e9
    write(tmp_path / "eval/report.json", {"seconds": 3})
    assert work("eval")[0] is None  # an older eval: no counts, no made-up floor
