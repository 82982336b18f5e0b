"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

`torch.load` of a pickle can run code hidden in the file, so a crafted checkpoint folder would
run code on resume. Charter therefore never unpickles: optimizer, scheduler and RNG state (nested
dicts, lists and tuples of tensors, numbers, strings, None) are split into the tensors, stored as
safetensors, and a JSON skeleton that names them, stored in the same file's metadata. Loading
reads only tensors and JSON. A leaf module.

Files are written from `safetensors_pieces`: the header, then each tensor's own memory, so
saving a state needs no copy of it (safetensors' `save` holds two: a 135M model's AdamW state
is 1.1 GB, and `pack`'s clones made it three, on top of the training run's peak).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from charter.core.errors import CharterError

META_KEY = "charter_state"


# safetensors' dtype names
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def pack(obj: Any, tensors: dict[str, torch.Tensor], where: str = "s") -> Any:
    """A JSON-able skeleton of `obj`; its tensors go into `tensors` under generated names (the
    tensors themselves, detached: write them before they change)."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach()
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


def safetensors_pieces(tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str] | None = None) -> list:
    """A safetensors file holding `tensors` as a list of bytes-like pieces: the 8-byte header
    length, the JSON header (padded to 8 bytes), then each tensor's memory as a view (CPU
    tensors are not copied). Tensors are laid out as safetensors lays them out (larger
    elements first, then by name), so every tensor stays aligned."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    views, offset = [], 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in DTYPES:
            raise TypeError(f"cannot store a {t.dtype} tensor ({name}) in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [len(head).to_bytes(8, "little"), head, *views]


def state_pieces(obj: Any) -> list:
    """`obj` as one safetensors file (its tensors, and its skeleton in the metadata), in
    pieces that share the tensors' memory (`safetensors_pieces`)."""
    tensors: dict[str, torch.Tensor] = {}
    skel = pack(obj, tensors)
    return safetensors_pieces(tensors, {META_KEY: json.dumps(skel)})


def state_bytes(obj: Any) -> bytes:
    """`obj` as the bytes of one safetensors file (`state_pieces`, joined)."""
    return b"".join(state_pieces(obj))


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
