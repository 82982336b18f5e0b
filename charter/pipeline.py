"""The one-command pipeline: critique → SFT → label → DPO → eval, resumable stage by stage.

    charter run examples/quickstart.yaml --out runs/quick

`run_pipeline(path, out)` loads and validates the whole pipeline file (see
`charter/pipeline_file.py`) and builds every stage's config before anything runs, writes the
held-out data split into `DIR/data/`, then runs the stages in order, each into `DIR/<stage>/`:

    critique → sft [→ eval-sft] → label → dpo → eval [→ label-2 → dpo-2 → eval-2 ...]

Wiring: critique's sft.jsonl is SFT's data; the SFT model is the first labelling policy and
DPO's starting model; each label stage's pairs.jsonl is the next DPO's data; each DPO model is
evaluated against the starting model and becomes the next iteration's policy (and labeller
with `labeler: policy`). A stage writes `DONE.json` (atomically) last; a re-run skips stages
whose DONE.json matches their settings, so a killed pipeline resumes (stages also resume
internally). A stage that finished with other settings, or a finished stage after one that must
run again, is an error telling which directory to delete. One backend per (kind, model) is
loaded once and shared by the stages that need it. `DIR/summary.json` (rewritten after every
stage) and `DIR/report.md` summarise it all; `final_model` is the last model trained.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.core import procmem, rundir
from charter.core.config import config_from_dict, field_defaults
from charter.core.errors import CharterError
from charter.core.records import write_jsonl_atomic
from charter.core.writable import check_output
from charter.pipeline_file import PipelineFile, load_pipeline_file, split_data
from charter.pipeline_stages import STAGE_KINDS, Context, StageKind
from charter.roles import CALL_TIME, RoleSpec, make_spec


@dataclass
class Stage:
    name: str  # the directory under DIR: critique, sft, label, label-2, eval-sft, ...
    kind: str  # a STAGE_KINDS key (what summary.json calls it)
    iteration: int
    cfg: Any
    step: StageKind  # the kind itself: wiring, inputs, outputs, how it runs
    fingerprint: str = ""
    roles: dict[str, RoleSpec] = dataclasses.field(default_factory=dict)  # role -> model


SHARED_DEFAULTS = ("backend", "seed")  # top-level keys copied into sections that have them


def _config_class(kind: StageKind) -> type:
    module, name = kind.config.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CharterError(f"this install has no {kind.config} ({e})") from None


# -- planning ---------------------------------------------------------------------------------


def plan(pf: PipelineFile, out: Path, kinds: dict[str, StageKind]) -> list[Stage]:
    """Every stage with its full config, wired; raises on any bad setting (file:line)."""
    c = pf.cfg
    data = out / "data"
    start = c.model

    def make(name: str, kind: str, iteration: int, wiring: dict,
             roles: dict | None = None) -> Stage:
        section = "eval" if kind == "eval" else kind
        raw, lines = pf.sections[section], pf.lines.get(section, {})
        spec = kinds[kind]
        cls = _config_class(spec)
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key in spec.wired:
                raise CharterError(f"set by the pipeline runner (it wires {', '.join(spec.wired)}"
                                   f" between stages); remove it here", path=pf.path,
                                   line=lines.get(key), field=f"{section}.{key}")
        values = {k: getattr(c, k) for k in SHARED_DEFAULTS if k in fields}
        values.update(raw)
        values.update({k: v for k, v in wiring.items() if k in fields and v is not None})
        missing = [k for k, v in wiring.items() if k not in fields and v is not None]
        if missing:
            raise CharterError(f"{spec.config} has no field {', '.join(missing)}: the pipeline "
                               "runner and this stage disagree (a bug; please report it)")
        cfg = config_from_dict(cls, values, source=str(pf.path),
                               lines={k: lines.get(k) or pf.lines[""].get(k)
                                      or pf.lines[""].get(section) for k in values})
        return Stage(name, kind, iteration, cfg, spec, roles=_stage_roles(cfg, roles or {}))

    def role(name: str, policy: str) -> RoleSpec | None:
        """The role `name` of the pipeline file with start/policy resolved."""
        spec = pf.roles.get(name)
        if spec is None or spec.model not in ("start", "policy"):
            return spec
        return spec.with_model(start if spec.model == "start" else policy)

    def suffix(k: int) -> str:
        return "" if k == 1 else f"-{k}"

    def evaluate(name: str, model: str, metrics: list[str], k: int) -> Stage:
        judge = role("judge", model)
        sft = str(out / "sft") if model != str(out / "sft") else None
        return make(name, "eval", k, {
            "model": model, "baseline": start, "sft_model": sft,
            "prompts": str(data / "eval.jsonl"), "out": str(out / name),
            "judge": _label(judge), "constitution": c.constitution, "metrics": metrics},
            {"model": model, "baseline": start, "sft_model": sft, "judge": judge})

    benign_train = pf.benign is not None and pf.benign.train != 0
    stages = [
        make("critique", "critique", 0, {
            "constitution": c.constitution, "prompts": str(data / "harmful-train.jsonl"),
            "helpful_prompts": str(data / "benign-train.jsonl") if benign_train else None,
            "out": str(out / "critique"), "model": start,
            "teacher": _label(role("teacher", start))},
            {"policy": start, "teacher": role("teacher", start)}),
        make("sft", "sft", 0, {"data": str(out / "critique" / "sft.jsonl"),
                               "out": str(out / "sft"), "model": start}),
    ]
    policy = str(out / "sft")
    if c.eval_sft:
        stages.append(evaluate("eval-sft", policy, [str(out / "sft")], 0))
    for k in range(1, c.iterations + 1):
        labeler = role("labeler", policy)
        stages.append(make(f"label{suffix(k)}", "label", k, {
            "constitution": c.constitution, "prompts": str(data / "train.jsonl"),
            "policy": policy, "labeler": _label(labeler),
            "second_labeler": _label(role("second_labeler", policy)),
            "out": str(out / f"label{suffix(k)}")},
            {"policy": policy, "labeler": labeler,
             "second_labeler": role("second_labeler", policy)}))
        stages.append(make(f"dpo{suffix(k)}", "dpo", k, {
            "data": str(out / f"label{suffix(k)}" / "pairs.jsonl"),
            "out": str(out / f"dpo{suffix(k)}"), "model": policy}))
        policy = str(out / f"dpo{suffix(k)}")
        stages.append(evaluate(f"eval{suffix(k)}", policy,
                               [str(out / "sft"), policy], k))
    check_wiring(out, stages)
    return stages


def _label(spec: RoleSpec | None) -> str | None:
    from charter.core.models import model_label

    return None if spec is None else model_label(spec.model)


def _stage_roles(cfg: Any, roles: dict) -> dict[str, RoleSpec]:
    """Each role of a stage as a RoleSpec: a plain model name runs on the stage's own backend
    with the stage section's backend settings (dtype, batch_size, server URLs...)."""
    from critique.backends.options import backend_kwargs

    out = {}
    section = backend_kwargs(cfg)
    for name, value in roles.items():
        if value is None:
            continue
        if isinstance(value, RoleSpec):  # a top-level role: it keeps its own backend and load
            out[name] = value.with_call_settings(section)  # options, takes the batch sizes
        else:
            out[name] = make_spec(getattr(cfg, "backend", "transformers"), value, section)
    return out


def fingerprint(stage: Stage, data_sha: str) -> str:
    """What a finished stage must match to be skipped: its settings, roles and the data split."""
    # per-call settings (batch sizes) change how a stage runs, not what it writes
    roles = {k: {o: x for o, x in v.describe().items() if o not in CALL_TIME}
             for k, v in sorted(stage.roles.items())}
    return rundir.fingerprint({"config": dataclasses.asdict(stage.cfg), "data": data_sha,
                               **({"roles": roles} if roles else {})})


def config_json(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _defaults(cfg: Any) -> dict:
    """Each field's default (JSON form): a setting a finished stage's record lacks (added to
    the stage in a later version of Charter) is no difference while it has its default."""
    return json.loads(json.dumps(field_defaults(cfg), default=str))


def stage_folder(out: Path, stage: Stage) -> rundir.RunFolder:
    """The guard of a stage's folder: DONE.json (written last) records its settings; a torn
    one means the stage runs again (its own resume keeps finished work)."""
    folder = out / stage.name
    return rundir.RunFolder(folder, state="DONE.json", key="config", field=None,
                            what="this stage finished", on_damage="ignore",
                            advice=f"delete {folder} (and the stages after it) to run it "
                                   "again, or restore them")


def read_done(out: Path, stage: Stage) -> dict | None:
    return stage_folder(out, stage).read()


def check_resumable(out: Path, stages: list[Stage], data_sha: str) -> list[bool]:
    """Which stages are done; errors for stale results (see the module docstring)."""
    done = []
    for st in stages:
        guard = stage_folder(out, st)
        d = guard.read()
        if d is not None and d.get("fingerprint") != st.fingerprint:
            stored = relocate(d.get("config") or {}, _made_in(d), out)
            diffs = rundir.differences(stored, config_json(st.cfg), defaults=_defaults(st.cfg))
            if d.get("data") != data_sha:
                diffs.append("the prompt data split")
            if diffs:
                raise guard.refusal(diffs, limit=5)
        done.append(d is not None)
    for i, st in enumerate(stages):
        if not done[i]:
            later = [s.name for s, d in zip(stages[i + 1:], done[i + 1:]) if d]
            if later:
                raise CharterError(f"{st.name} must run again, but {', '.join(later)} already "
                                   f"finished with its old output; delete "
                                   f"{', '.join(str(out / n) for n in later)} to redo them")
            break
    return done


def _made_in(done: dict) -> str | None:
    """The run folder a finished stage was made in: recorded in DONE.json (`run`), else (older
    records) the parent of the stage's own `out`."""
    if isinstance(done.get("run"), str):
        return done["run"]
    own = (done.get("config") or {}).get("out")
    return str(Path(own).parent) if isinstance(own, str) else None


def relocate(value: Any, old: str | None, new: Path) -> Any:
    """`value` (a stage's JSON config) with every path inside run folder `old` rewritten to the
    same place inside `new`: a moved or copied run folder (`mv runs/a runs/b`) resumes, while
    a path outside the folder (a model, a data file) is still compared as written."""
    if old is None or Path(old) == new:
        return value
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    if isinstance(value, str) and value:
        here, was = Path(os.path.abspath(value)), Path(os.path.abspath(old))
        if _inside(here, was):
            return str(new / here.relative_to(was))
    return value


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_wiring(out: Path, stages: list[Stage]) -> None:
    """Every input a stage reads from inside the run folder is the data split or what an
    earlier stage writes (or a folder it writes into): a plan that breaks this is a bug."""
    written: list[Path] = [out / "data"]
    for st in stages:
        for name, path in st.step.inputs(st.cfg).items():
            if _inside(path, out) and not any(_inside(w, path) or _inside(path, w)
                                              for w in written):
                raise CharterError(f"stage {st.name} reads {name} = {path}, which no earlier "
                                   "stage writes (a bug in the pipeline runner; please report "
                                   "it)")
        written += st.step.outputs(st.cfg).values()


def check_inputs(out: Path, st: Stage) -> None:
    """Before a stage runs: what it reads from earlier stages is there."""
    for name, path in st.step.inputs(st.cfg).items():
        if _inside(path, out) and not path.exists():
            raise CharterError(f"stage {st.name} needs its {name} from an earlier stage, but "
                               f"it is missing; delete the stage that writes it to run it "
                               "again", path=path)


def check_outputs(st: Stage) -> None:
    """After a stage ran: it left what the stages after it read."""
    for name, path in st.step.outputs(st.cfg).items():
        if not path.exists():
            raise CharterError(f"stage {st.name} finished without writing its {name}",
                               path=path)


# -- running ----------------------------------------------------------------------------------


def default_out(path: str | Path) -> Path:
    return Path("runs") / Path(path).stem


def run_pipeline(path: str | Path, out: str | Path | None = None,
                 kinds: dict[str, StageKind] | None = None, check: bool = False,
                 constitution: str | None = None) -> dict:
    """Run (or resume) the pipeline file at `path` into `out`; returns summary.json's content.

    `check=True` only validates: it returns the plan (each stage, whether it is done, and its
    resolved config) and writes nothing. `constitution` replaces the file's principle file
    (the B side of `charter run --compare`)."""
    from charter.pipeline_report import card_roles, write_summary

    kinds = kinds or STAGE_KINDS
    pf = load_pipeline_file(path)
    if constitution is not None:
        pf.cfg.constitution = str(Path(constitution).resolve())
    out = Path(out or pf.cfg.out or default_out(path))
    splits = split_data(pf)  # reads (and so checks) every prompt file
    data_sha = rundir.fingerprint(splits)
    stages = plan(pf, out, kinds)
    for st in stages:
        st.fingerprint = fingerprint(st, data_sha)
    done = check_resumable(out, stages, data_sha)
    if check:
        return {"pipeline": str(pf.path), "out": str(out), "data": {
            k: len(v) for k, v in splits.items()}, "stages": [
            {"name": st.name, "status": "done" if d else "pending",
             "roles": {r: spec.describe() for r, spec in st.roles.items()},
             "inputs": {k: str(v) for k, v in st.step.inputs(st.cfg).items()},
             "outputs": {k: str(v) for k, v in st.step.outputs(st.cfg).items()},
             "config": dataclasses.asdict(st.cfg)} for st, d in zip(stages, done)]}

    check_output(out)  # writable, with free space, before any stage runs
    for name, rows in splits.items():
        if rows and _changed(out / "data" / f"{name}.jsonl", rows):
            write_jsonl_atomic(out / "data" / f"{name}.jsonl", rows)
    shutil.copyfile(pf.path, out / "pipeline.yaml")
    state = {st.name: {"status": "done" if d else "pending"} for st, d in zip(stages, done)}
    for st, d in zip(stages, done):
        if d:
            prev = read_done(out, st) or {}
            state[st.name].update(status="skipped", seconds=prev.get("seconds"),
                                  memory=prev.get("memory"),
                                  result=relocate(prev.get("result"), _made_in(prev), out))
    ctx = Context()
    t_all = time.time()
    try:
        for st, d in zip(stages, done):
            if d:
                print(f"[charter run] {st.name}: already done, skipped")
                continue
            print(f"[charter run] {st.name}: running into {out / st.name}")
            check_inputs(out, st)
            st.step.before(out, st.name)
            ctx.pool.release(_needed_from(stages, stages.index(st)))
            free_memory()  # what the stages before left (models, activations) is gone
            rss_start = procmem.reset_peak()
            ctx.roles = st.roles
            state[st.name]["status"] = "running"
            write_summary(out, pf, stages, state, time.time() - t_all, plot=False)
            t0 = time.time()
            try:
                result = st.step.run(st.cfg, ctx)
                check_outputs(st)
            except BaseException as e:
                state[st.name].update(status="failed" if isinstance(e, Exception)
                                      else "interrupted", error=str(e)[:500],
                                      seconds=round(time.time() - t0, 2))
                raise
            seconds = round(time.time() - t0, 2)
            memory = {"start_mb": rss_start, "peak_mb": procmem.peak_mb()}  # resident, MB
            stage_folder(out, st).record({
                "stage": st.name, "fingerprint": st.fingerprint, "data": data_sha,
                "run": str(out), "seconds": seconds, "memory": memory,
                "result": result, "config": config_json(st.cfg)})
            state[st.name] = {"status": "done", "seconds": seconds, "memory": memory,
                              "result": result}
    finally:
        ctx.close()
        summary = write_summary(out, pf, stages, state, time.time() - t_all)
        if summary.get("final_model"):
            card_roles(Path(summary["final_model"]), summary["roles"])
    return summary


def _needed_from(stages: list[Stage], i: int) -> set[tuple]:
    """Load keys of the backends that stage i and the stages after it use before the next
    training stage: everything else is freed (training needs the memory more, and a local model
    reloads in seconds)."""
    keys: set[tuple] = set()
    for st in stages[i:]:
        if st.step.trains:
            break
        keys |= {spec.load_key() for spec in st.roles.values()}
    return keys


def free_memory() -> None:
    """Before a stage: collect the earlier stages' models now (a training run's Accelerator and
    model sit in reference cycles, freed only when the cyclic collector runs), and hand the
    freed heap back to the system (glibc keeps freed small blocks mapped: the next stage's peak
    would add to them)."""
    procmem.collect()


def _changed(path: Path, rows: list[dict]) -> bool:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return not path.exists() or path.read_text(encoding="utf-8") != text
