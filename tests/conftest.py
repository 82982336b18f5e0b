"""Shared fixtures: a tiny random-init llama with the embedded model's tokenizer, a fake backend.

The tiny model has the real SmolLM2 tokenizer and chat template (so tokenisation and templating
are exercised for real) but 2 layers of width 32: a forward pass takes milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = ROOT / "examples" / "data"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time


def build_tiny_model(out: Path, seed: int = 0, layers: int = 2, width: int = 32) -> Path:
    """Save a random-init llama (real SmolLM2 tokenizer + chat template) to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from charter.core.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_sft_or_pairs(path: Path, stage: str, please: int = 1) -> Path:
    """Eight tiny conversations as SFT rows (stage "sft") or preference pairs (else), written
    as JSONL; prompt i carries `please` x (i % 4) extra words, so lengths differ."""
    import json

    rows, pairs = [], []
    for i in range(8):
        q = f"Say {i}" + " please" * (please * (i % 4))
        rows.append({"messages": [{"role": "user", "content": q},
                                  {"role": "assistant", "content": f"{i}." * (1 + i % 3)}]})
        pairs.append({"prompt": [{"role": "user", "content": q}],
                      "chosen": [{"role": "assistant", "content": f"{i}." * (1 + i % 3)}],
                      "rejected": [{"role": "assistant", "content": "No."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows if stage == "sft" else pairs)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory loadable by AutoModelForCausalLM/AutoTokenizer.from_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def fake_backend():
    from critique.backends.fake import FakeBackend

    return FakeBackend()


@pytest.fixture(scope="session")
def example_data() -> Path:
    """examples/data: the third-party prompt sets shipped with the repository (sources and
    licences in its README)."""
    return EXAMPLE_DATA


def pytest_addoption(parser):
    # Kill-and-resume soaks (tests/test_kill_resume.py): the default is a few trials per
    # command, sized for CI; `--trials N` runs N per command (and runs the `slow` soaks).
    parser.addoption("--trials", type=int, default=None, metavar="N",
                     help="kill/resume trials per command (default: a few, sized for CI)")


def pytest_collection_modifyitems(config, items):
    # `slow` soaks run only when asked for (-m slow); the default run stays CI-sized.
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="soak test: runs with -m slow (and --trials N to size it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def trials(request):
    """`--trials N`, or None for each test's CI-sized default."""
    return request.config.getoption("--trials")


@contextlib.contextmanager
def _deadline(seconds: float):
    def hang(signum, frame):
        raise TimeoutError(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def deadline():
    """`with deadline(s): ...` fails with TimeoutError instead of hanging the suite (SIGALRM,
    main thread; the template renderer puts an outer timer back after its own)."""
    return _deadline
