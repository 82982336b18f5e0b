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
import hashlib
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.core.config import config_from_dict
from charter.core.errors import CharterError
from charter.core.records import write_json_atomic, write_jsonl_atomic
from charter.core.writable import check_output
from charter.pipeline_file import PipelineFile, load_pipeline_file, split_data
from charter.roles import BackendPool, RoleSpec, make_spec


@dataclass
class StageKind:
    """How to build and run one kind of stage."""

    config: str  # "module:Class" of the stage's config dataclass
    run: Callable[[Any, Context], dict]  # (config, context) -> result summary
    wired: tuple[str, ...]  # keys the runner fills (a section may not set them)


@dataclass
class Stage:
    name: str  # the directory under DIR: critique, sft, label, label-2, eval-sft, ...
    kind: str  # a STAGE_KINDS key
    iteration: int
    cfg: Any
    fingerprint: str = ""
    roles: dict[str, RoleSpec] = dataclasses.field(default_factory=dict)  # role -> model


class Context:
    """What stages share while the pipeline runs: the pool of loaded backends, and the roles
    (role -> `charter.roles.RoleSpec`) of the stage now running."""

    def __init__(self, pool: BackendPool | None = None) -> None:
        self.pool = pool or BackendPool()
        self.roles: dict[str, RoleSpec] = {}

    def backend(self, role: str):
        """The loaded backend of this stage's `role` (None when the stage has no such role)."""
        spec = self.roles.get(role)
        return None if spec is None else self.pool.get(spec)

    def release(self, role: str) -> None:
        """Done with `role` in this stage: free its backend unless another role uses it."""
        spec = self.roles.get(role)
        if spec is not None:
            keep = {s.load_key() for r, s in self.roles.items() if r != role and s is not None}
            keep |= {k for k in self.pool.keys() if k != spec.load_key()}
            self.pool.release(keep)

    def close(self) -> None:
        self.pool.close()


# -- the stage kinds (their real entry points; tests may pass others) -------------------------


def _run_critique(cfg, ctx: Context) -> dict:
    from critique.revise.run import run_critique

    manifest = run_critique(cfg, backend=ctx.backend("policy"),
                            teacher_backend=ctx.backend("teacher"))
    counts = manifest.get("counts") or {}
    if not counts.get("sft_examples"):
        raise CharterError(f"critique wrote no SFT examples ({counts.get('flagged', 0)} records "
                           f"flagged: {counts.get('flagged_by_reason')}); see the records: "
                           "larger max_new_tokens, other few-shot examples or another model",
                           path=Path(cfg.out) / "records.jsonl")
    return {"counts": counts}


def _train(fn: str) -> Callable[[Any, Context], dict]:
    def run(cfg, ctx: Context) -> dict:
        module, name = fn.split(":")
        final = getattr(importlib.import_module(module), name)(cfg)
        from critique.evaluate.report import read_metrics

        rows = read_metrics(cfg.out)
        last = {k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, float)}
        return {"final_model": str(final), "steps": rows[-1].get("step") if rows else None,
                "last_metrics": last}
    return run


def _run_label(cfg, ctx: Context) -> dict:
    from critique.label.run import run_label

    report = run_label(cfg, backend=ctx.backend("labeler"), policy_backend=ctx.backend("policy"),
                       second_backend=ctx.backend("second_labeler"))
    if not report.get("n"):
        raise CharterError("labelling made no preference pairs (every prompt's samples were "
                           "identical or failed); raise temperature or samples",
                           path=Path(cfg.out) / "pairs.jsonl")
    keep = ("counts", "diagnostics", "relabel")
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) or k in keep}


def _run_eval(cfg, ctx: Context) -> dict:
    from critique.evaluate.run import run_eval

    # loaded when the eval reaches each role, freed when done with it (one model at a time)
    backends = {role: (lambda r=role: ctx.backend(r)) for role in ctx.roles}
    headline = eval_headline(run_eval(cfg, backends, release=ctx.release))
    from charter.core.models import resolve_model
    from training.cards import add_to_card

    try:  # the evaluated model's card gains the headline (a trained model of this run)
        add_to_card(Path(resolve_model(cfg.model)) / "README.md", headline=headline)
    except CharterError:
        pass  # not a local model folder: no card to update
    return headline


def eval_headline(report: dict) -> dict:
    """Refusal rates (baseline and model), their change, and the judge's win rates."""
    out: dict = {}
    for role, m in report["models"].items():
        for label in ("harmful", "benign"):
            out[f"{role}_{label}_refusal"] = m[label]["refusal"]["rate"]
    for key, value in (report.get("delta") or {}).items():
        out[f"delta_{key}"] = value
    for label, w in (report.get("win_rate") or {}).items():
        out[f"win_rate_{label}"] = w["win_rate"]
        out[f"win_ci95_{label}"] = w["win_ci95"]
    for name, by_label in (report.get("win_rates") or {}).items():
        if name != "model_vs_baseline":
            for label in ("harmful", "benign"):
                if label in by_label:
                    out[f"win_rate_{name}_{label}"] = by_label[label]["win_rate"]
                    out[f"win_ci95_{name}_{label}"] = by_label[label]["win_ci95"]
    return out


STAGE_KINDS: dict[str, StageKind] = {
    "critique": StageKind("critique.revise.run:CritiqueConfig", _run_critique,
                          ("constitution", "prompts", "helpful_prompts", "out", "model",
                           "teacher")),
    "sft": StageKind("training.options:SFTConfig", _train("training.sft:train_sft"),
                     ("data", "out", "model")),
    "label": StageKind("critique.label.run:LabelConfig", _run_label,
                       ("constitution", "prompts", "pairs", "policy", "labeler",
                        "second_labeler", "out")),
    "dpo": StageKind("training.options:DPOConfig", _train("training.dpo:train_dpo"),
                     ("data", "out", "model")),
    "eval": StageKind("critique.evaluate.run:EvalConfig", _run_eval,
                      ("model", "baseline", "sft_model", "prompts", "harmful", "benign", "out",
                       "judge", "judge_backend", "constitution", "metrics")),
}
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
        return Stage(name, kind, iteration, cfg, roles=_stage_roles(cfg, roles or {}))

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
    return stages


def _label(spec: RoleSpec | None) -> str | None:
    from charter.core.models import model_label

    return None if spec is None else model_label(spec.model)


def _stage_roles(cfg: Any, roles: dict) -> dict[str, RoleSpec]:
    """Each role of a stage as a RoleSpec: a plain model name runs on the stage's own backend
    with the stage section's backend settings (dtype, batch_size, server URLs...)."""
    from critique.backends.options import backend_kwargs

    out = {}
    for name, value in roles.items():
        if value is None:
            continue
        if isinstance(value, RoleSpec):
            out[name] = value
        else:
            out[name] = make_spec(getattr(cfg, "backend", "transformers"), value,
                                  backend_kwargs(cfg))
    return out


def fingerprint(stage: Stage, data_sha: str) -> str:
    """What a finished stage must match to be skipped: its settings, roles and the data split."""
    roles = {k: v.describe() for k, v in sorted(stage.roles.items())}
    blob = json.dumps({"config": dataclasses.asdict(stage.cfg), "data": data_sha,
                       **({"roles": roles} if roles else {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_json(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def settings_diff(stored: dict, cfg: Any) -> list[str]:
    """`key: old → new` for each setting that differs from a finished stage's. A key the stored
    config lacks is ignored while the current value is the field's default (a setting added to
    the stage in a later version of Charter changes nothing that was done)."""
    now = config_json(cfg)
    defaults = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    defaults = json.loads(json.dumps(defaults, default=str))
    diffs = []
    for key in sorted(set(stored) | set(now)):
        if key not in stored and key in defaults and now.get(key) == defaults[key]:
            continue
        if stored.get(key) != now.get(key):
            diffs.append(f"{key}: {stored.get(key)!r} → {now.get(key)!r}")
    return diffs


def read_done(out: Path, stage: Stage) -> dict | None:
    path = out / stage.name / "DONE.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # torn: the stage runs again (its own resume keeps finished work)


def check_resumable(out: Path, stages: list[Stage], data_sha: str) -> list[bool]:
    """Which stages are done; errors for stale results (see the module docstring)."""
    done = []
    for st in stages:
        d = read_done(out, st)
        if d is not None and d.get("fingerprint") != st.fingerprint:
            diffs = settings_diff(d.get("config") or {}, st.cfg)
            if d.get("data") != data_sha:
                diffs.append("the prompt data split")
            if diffs:
                raise CharterError(
                    f"{out / st.name} finished with other settings ({'; '.join(diffs[:5])}); "
                    "delete it (and the stages after it) to run it again, or restore them",
                    path=out / st.name / "DONE.json")
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
    data_sha = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]
    stages = plan(pf, out, kinds)
    for st in stages:
        st.fingerprint = fingerprint(st, data_sha)
    done = check_resumable(out, stages, data_sha)
    if check:
        return {"pipeline": str(pf.path), "out": str(out), "data": {
            k: len(v) for k, v in splits.items()}, "stages": [
            {"name": st.name, "status": "done" if d else "pending",
             "roles": {r: spec.describe() for r, spec in st.roles.items()},
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
                                  result=prev.get("result"))
    ctx = Context()
    t_all = time.time()
    try:
        for st, d in zip(stages, done):
            if d:
                print(f"[charter run] {st.name}: already done, skipped")
                continue
            print(f"[charter run] {st.name}: running into {out / st.name}")
            _reuse_baseline(out, st)
            ctx.pool.release(_needed_from(stages, stages.index(st)))
            free_memory()  # what the stages before left (models, activations) is gone
            ctx.roles = st.roles
            state[st.name]["status"] = "running"
            write_summary(out, pf, stages, state, time.time() - t_all, plot=False)
            t0 = time.time()
            try:
                result = kinds[st.kind].run(st.cfg, ctx)
            except BaseException as e:
                state[st.name].update(status="failed" if isinstance(e, Exception)
                                      else "interrupted", error=str(e)[:500],
                                      seconds=round(time.time() - t0, 2))
                raise
            seconds = round(time.time() - t0, 2)
            write_json_atomic(out / st.name / "DONE.json", {
                "stage": st.name, "fingerprint": st.fingerprint, "data": data_sha,
                "seconds": seconds, "result": result, "config": config_json(st.cfg)})
            state[st.name] = {"status": "done", "seconds": seconds, "result": result}
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
        if st.kind in ("sft", "dpo"):
            break
        keys |= {spec.load_key() for spec in st.roles.values()}
    return keys


def free_memory() -> None:
    """Before a stage: collect the earlier stages' models now (a training run's Accelerator and model sit in
    reference cycles, freed only when the cyclic collector runs), and hand the freed heap back
    to the system (glibc keeps freed activation memory mapped: the next stage's peak would add
    to it)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: its allocator returns memory its own way


def _changed(path: Path, rows: list[dict]) -> bool:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return not path.exists() or path.read_text(encoding="utf-8") != text


def _reuse_baseline(out: Path, st: Stage) -> None:
    """Later evals compare against the same starting model: reuse its greedy responses (the
    eval's resume check keys them by model, prompt and token budget, so nothing stale is used)."""
    if st.kind != "eval":
        return
    target = out / st.name / "responses-baseline.jsonl"
    for src in sorted(out.glob("eval*/responses-baseline.jsonl")):
        if src != target and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
