"""Run directories, checkpoints and the final model.

A checkpoint `out/checkpoint-STEP/` holds the trainable weights (all of them, or only the LoRA
adapter) as `model.safetensors`, the optimizer and scheduler state and each process's RNG state
as safetensors (`charter.core.safestate`: tensors plus a JSON skeleton, never pickle, so a crafted
checkpoint cannot run code on resume), the resolved config, and last a `manifest.json` that
lists every file with its size and sha256. It is written under a temporary name and renamed
when complete, so a run killed while saving leaves no checkpoint that looks complete; leftovers
are ignored and cleaned up. Resume takes the newest checkpoint whose files match its manifest,
says which, and explains any newer one that is damaged. Under FSDP every process writes its
shard of the weights and optimizer state instead (`training.fsdp`); each process hashes what
it wrote and the manifest lists the union, so a checkpoint is complete only with every shard.

A run folder is identified by its content (`train_config.json`: stage, settings, and the
identity of the data and model it trains on), not by the spelling of its path, so a run resumes
when `--out` is given relative or absolute, or after the folder was moved.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from charter.core.errors import CharterError
from charter.core.records import write_json_atomic, write_text_atomic
from charter.core.rundir import RunFolder
from charter.core.safestate import load_state, safetensors_pieces, state_pieces
from charter.core.writable import disk_error, nbytes, write_bytes_durable
from training import fsdp
from training.cards import model_card  # noqa: F401  (re-exported for the loops)

CONFIG_NAME = "train_config.json"  # not config.json: that name marks a model directory
MANIFEST = "manifest.json"  # written last: a checkpoint without it is not complete
FORMAT = "charter-checkpoint/1"
# Settings that may change between a run and its resumption.
# share_prompt only changes how the same log-probs are computed; `out` is where the run is, not
# what it is (a moved folder resumes).
# fsdp: checkpoints load whether written sharded or not, on any number of processes.
RESUMABLE = {"save_every", "log_every", "report_to", "epochs", "max_steps", "trust_remote_code",
             "share_prompt", "keep_checkpoints", "out", "merge", "chunked_logps", "fsdp"}
PATH_FIELDS = ("data", "model", "ref_model")  # compared by what they hold, not how spelled


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from a run file, or a `CharterError` saying the file is damaged."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CharterError(f"{what} is damaged or empty ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})", path=path) from None
    if not isinstance(obj, dict):
        raise CharterError(f"{what} is damaged: expected a JSON object, got "
                           f"{type(obj).__name__}", path=path)
    return obj


def path_identity(value: str | None) -> str | None:
    """What a data/model path holds: a hash of a file's bytes or of a folder's file names, sizes
    and small files' bytes; a name that is not a path (hub id, `smollm2`) stands for itself."""
    if value is None:
        return None
    p = Path(value)
    if not p.exists():
        return value
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else ''}:{st.st_size}\n".encode())
        if st.st_size <= 64 << 20:  # weights are identified by name and size; data by bytes
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()


def check_run_dir(out: Path, cfg_dict: dict, stage: str) -> dict:
    """Refuse to resume a run made with different settings (before any model loads); return
    the record to write as train_config.json."""
    identity = {k: path_identity(cfg_dict.get(k)) for k in PATH_FIELDS if k in cfg_dict}
    record = {"stage": stage, **cfg_dict, "identity": identity}
    guard = run_folder(out, stage)
    old = guard.stored()
    if old is None:
        return record
    if old.get("stage") != stage:
        raise CharterError(f"this directory holds a {old.get('stage')} run, not {stage}; "
                           "use another --out", path=out, field="out")
    old_id = old.get("identity") or {}

    def same(k, _old, _new):  # a path spelled otherwise (a moved folder) holding the same
        return k in PATH_FIELDS and k in old_id and old_id[k] == identity.get(k)

    guard.check(cfg_dict, stored=old, ignore=RESUMABLE, same=same, current_only=True)
    return record


def run_folder(out: Path, stage: str) -> RunFolder:
    """The guard of a training folder: its settings are the whole train_config.json."""
    return RunFolder(out, state=CONFIG_NAME, key=None, what=f"a {stage} run")


def prepare_run_dir(acc, out: Path, cfg_dict: dict, stage: str) -> None:
    """Create `out`, refuse to resume a run made with different settings, write the config."""
    out.mkdir(parents=True, exist_ok=True)
    record = check_run_dir(out, cfg_dict, stage)
    acc.wait_for_everyone()
    if acc.is_main_process:
        run_folder(out, stage).record(record)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(d: Path) -> str | None:
    """Why checkpoint folder `d` cannot be resumed from, or None when it is intact."""
    if (d / "state.json").exists() and not (d / MANIFEST).exists():
        return ("written by an older Charter in pickle format, which is never loaded (a pickle "
                "can run code)")
    if not (d / MANIFEST).exists():
        return f"no {MANIFEST} (not completely written)"
    try:
        man = read_json_file(d / MANIFEST, MANIFEST)
        files, step = man["files"], int(man["step"])
    except (CharterError, KeyError, TypeError, ValueError) as e:
        return f"{MANIFEST} is damaged ({e})"
    if f"checkpoint-{step}" != d.name:
        return f"{MANIFEST} says step {step}"
    for name, meta in sorted(files.items()):
        f = d / name
        if "/" in name or name.startswith("."):
            return f"{MANIFEST} names a file outside the checkpoint ({name!r})"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta.get('bytes')}"
        if _sha256(f) != meta.get("sha256"):
            return f"{name} does not match its checksum (damaged on disk?)"
    try:
        fsdp.shard_world(d)  # a sharded checkpoint has every process's shard
    except CharterError as e:
        return e.detail
    return None


def _step_dirs(out: Path) -> list[tuple[int, Path]]:
    return sorted(((int(d.name.removeprefix("checkpoint-")), d) for d in out.glob("checkpoint-*")
                   if d.name.removeprefix("checkpoint-").isdigit() and d.is_dir()), reverse=True)


def find_resume(out: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint, and a line for each newer one that is damaged."""
    damaged = []
    for _, d in _step_dirs(out):
        problem = checkpoint_problem(d)
        if problem is None:
            return d, damaged
        damaged.append(f"{d} is damaged: {problem}")
    return None, damaged


def latest_checkpoint(out: Path) -> Path | None:
    """The intact checkpoint with the highest step (temporary leftovers are not candidates)."""
    return find_resume(out)[0]


def resume_point(out: Path, say) -> Path | None:
    """`find_resume`, saying why damaged checkpoints are passed over. With damaged checkpoints
    and no intact one, stop rather than silently start over."""
    last, damaged = find_resume(out)
    for line in damaged:
        say(f"{line}; skipped")
    if last is None and damaged:
        raise CharterError("no intact checkpoint to resume from (" + "; ".join(damaged) +
                           "); move the damaged checkpoint folders away to start from step 0",
                           path=out, field="out")
    return last


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def write_manifest(d: Path, step: int, written: dict[str, dict] | None = None) -> None:
    """List every file in checkpoint folder `d` with its size and sha256 (written last).
    `written`: the sizes and hashes the processes computed as they wrote; each must be on disk
    with that size (a shard another node wrote that this one cannot see is an error)."""
    names = sorted(f.name for f in d.iterdir() if f.is_file() and f.name != MANIFEST)
    files = dict(written or {})
    for name, meta in files.items():
        if not (d / name).is_file() or (d / name).stat().st_size != meta["bytes"]:
            raise CharterError(f"{name} was written but is not complete here (is --out on a "
                               "file system every node shares?)", path=d)
    for name in names:
        if name not in files:
            files[name] = {"bytes": (d / name).stat().st_size, "sha256": _sha256(d / name)}
    write_json_atomic(d / MANIFEST, {"format": FORMAT, "step": step,
                                     "files": dict(sorted(files.items()))})


def _digest(data) -> str:
    """sha256 of what `write_bytes_durable` writes for `data` (bytes or a list of pieces)."""
    h = hashlib.sha256()
    for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        h.update(piece)
    return h.hexdigest()


def save_checkpoint(acc, model, opt, sched, step: int, out: Path, cfg_dict: dict) -> Path:
    """Write out/checkpoint-STEP atomically (every process writes its RNG state, and under FSDP
    its shard). A full or read-only disk, on any process, stops every process with the path and
    the space needed; the half-written folder is removed and the previous checkpoint stays the
    one to resume from."""
    from accelerate.utils import gather_object

    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    # each unsharded file's pieces are views of the live tensors: writing them copies nothing
    # (weights and AdamW state are 3x the model's size, so copies would raise the run's peak)
    blobs = {f"rng-{acc.process_index}.safetensors": state_pieces(_rng_state())}
    if fsdp.is_sharded(model):  # every process writes its rows; nothing is gathered
        blobs.update(fsdp.shard_blobs(acc, model, opt))
    elif acc.is_main_process:
        blobs["model.safetensors"] = safetensors_pieces(_trainable_state(acc.unwrap_model(model)))
        blobs["optimizer.safetensors"] = state_pieces(opt.state_dict())
    if acc.is_main_process:
        blobs["scheduler.safetensors"] = state_pieces(sched.state_dict())
        blobs[CONFIG_NAME] = (json.dumps(cfg_dict, indent=2) + "\n").encode()
    need = sum(nbytes(b) for b in blobs.values())
    # each process hashes what it wrote (from memory: no file is read back, and no process
    # reads another's shards); the manifest is the union
    mine = {n: {"bytes": nbytes(b), "sha256": _digest(b)} for n, b in blobs.items()}
    err: BaseException | None = None
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        for name, blob in blobs.items():
            write_bytes_durable(tmp / name, blob)
    except (OSError, CharterError) as e:
        err = e
    # every process learns whether any failed, so none waits for one that stopped
    parts = gather_object([None if err else mine])
    if err is None and any(p is None for p in parts):
        err = CharterError("another process could not write its part of the checkpoint",
                           path=final)
    if err is None and acc.is_main_process:
        try:
            files = {n: meta for part in parts for n, meta in part.items()}
            write_manifest(tmp, step, files)  # written last: marks complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, CharterError) as e:
            err = e
    if not all(gather_object([err is None])) and err is None:
        err = CharterError("the checkpoint's manifest could not be written", path=final)
    if err is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(err, final, need, "checkpoint not saved; the previous checkpoint is "
                         "intact, re-run the same command to resume from it") from None
    if acc.is_main_process:
        prune_checkpoints(out, cfg_dict.get("keep_checkpoints"))
    acc.wait_for_everyone()
    return final


def prune_checkpoints(out: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (None: keep all). Called after a
    new one is complete, so a resume always has the latest."""
    if not keep:
        return
    done = [(s, d) for s, d in _step_dirs(out) if (d / MANIFEST).exists()]
    for _, d in done[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(acc, model, opt, sched, ckpt: Path) -> int:
    """Restore weights, optimizer, scheduler and RNG; return the step to continue from. The
    weights and optimizer state may be full or sharded, written by any number of processes
    (`training.fsdp`)."""
    step = int(read_json_file(ckpt / MANIFEST, MANIFEST)["step"])
    fsdp.load_weights_and_optimizer(acc, acc.unwrap_model(model), opt, ckpt)
    try:
        sched.load_state_dict(load_state(ckpt / "scheduler.safetensors"))
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CharterError(f"optimizer or scheduler state does not fit this run ({e})",
                           path=ckpt) from None
    rng_file = ckpt / f"rng-{acc.process_index}.safetensors"
    if rng_file.exists():
        rng = load_state(rng_file)
        try:
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CharterError(f"damaged RNG state ({e})", path=rng_file) from None
    return step


def clean_partial(out: Path) -> None:
    for d in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(d, ignore_errors=True)
    for d in out.glob(".final.tmp"):
        shutil.rmtree(d, ignore_errors=True)


def finished(out: Path, total: int) -> bool:
    """Whether out/final holds the result of a run of `total` steps (re-running is a no-op)."""
    f = out / "final" / "charter_state.json"
    return f.exists() and read_json_file(f, "final model's state").get("step") == total


def save_final(acc, model, tok, out: Path, card: str, step: int, merge: bool = False) -> Path:
    """out/final: safetensors + tokenizer + README.md (the model card).

    With LoRA, final/ is the peft adapter (adapter_config.json + adapter_model.safetensors,
    loadable with PeftModel.from_pretrained(base, final)); with `merge` it is the merged model
    and the adapter is kept in final/adapter/."""
    final, tmp = out / "final", out / ".final.tmp"
    acc.wait_for_everyone()
    # sharded (FSDP): gathered on process 0 (every process takes part), saved as one model
    full = fsdp.full_state_dict(acc, model)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = acc.unwrap_model(model)
        need = sum(p.numel() * p.element_size() for p in unwrapped.parameters())
        given = {} if full is None else {"state_dict": full}
        try:
            if hasattr(unwrapped, "merge_and_unload"):  # peft
                unwrapped.save_pretrained(tmp / "adapter" if merge else tmp,
                                          safe_serialization=True, **given)
                if merge:  # fold the adapter into the weights
                    unwrapped = unwrapped.merge_and_unload()
            if not hasattr(unwrapped, "merge_and_unload"):
                unwrapped.config.use_cache = True
                unwrapped.save_pretrained(tmp, safe_serialization=True, **given)
            tok.save_pretrained(tmp)
            write_text_atomic(tmp / "README.md", card)
            write_json_atomic(tmp / "charter_state.json", {"step": step})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, CharterError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = disk_error(e, final, need, "final model not saved; the last checkpoint is "
                             "intact, re-run the same command to finish")
            if err is None:
                raise
            raise err from None
    acc.wait_for_everyone()
    return final
