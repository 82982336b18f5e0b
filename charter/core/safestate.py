"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

`torch.load` of a pickle can run code hidden in the file, so a crafted checkpoint folder would
run code on resume. Charter therefore never unpickles: optimizer, scheduler and RNG state (nested
dicts, lists and tuples of tensors, numbers, strings, None) are split into the tensors, stored as
safetensors, and a JSON skeleton that names them, stored in the same file's metadata. Loading
reads only tensors and JSON. A leaf module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from charter.core.errors import CharterError

META_KEY = "charter_state"


def pack(obj: Any, tensors: dict[str, torch.Tensor], where: str = "s") -> Any:
    """A JSON-able skeleton of `obj`; its tensors go into `tensors` under generated names."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors, where), pack(v, tensors, where)]
                              for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} at {where} without pickle")


def unpack(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `pack`."""
    if isinstance(skel, list):
        return [unpack(v, tensors) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__tuple__" in skel:
            return tuple(unpack(v, tensors) for v in skel["__tuple__"])
        if "__items__" in skel:
            return {_hashable(unpack(k, tensors)): unpack(v, tensors)
                    for k, v in skel["__items__"]}
        return {k: unpack(v, tensors) for k, v in skel.items()}
    return skel


def _hashable(key: Any) -> Any:
    return key if not isinstance(key, list) else tuple(key)


def state_bytes(obj: Any) -> bytes:
    """`obj` as one safetensors file: its tensors, and its skeleton in the metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skel = pack(obj, tensors)
    return save(tensors, metadata={META_KEY: json.dumps(skel)})


def load_state(path: str | os.PathLike) -> Any:
    """Read a file written from `state_bytes`; a damaged file is a `CharterError` naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        skel = json.loads(meta[META_KEY])
        return unpack(skel, tensors)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CharterError(f"damaged state file ({type(e).__name__}: {e})", path=path) from None
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        if type(e).__name__ == "SafetensorError":
            raise CharterError(f"damaged state file ({e})", path=path) from None
        raise
