"""The stages of `charter run`: each kind an object that declares what it reads and writes.

A stage kind knows its config dataclass (`config`, "module:Class"), the fields the runner wires
between stages (`wired`: a pipeline section may not set them), the files and models it reads
from earlier stages (`inputs(cfg)`) and what it leaves for the stages after it
(`outputs(cfg)`), and how it runs (`run(cfg, ctx)` → a result summary). The runner
(`charter/pipeline.py`) checks when planning that every input inside the run folder is an
earlier stage's output, before a stage runs that its inputs exist, and after it ran that its
outputs do.

A new stage: a subclass here with `config`, `wired`, `inputs`, `outputs` and `execute`, an
entry in `STAGE_KINDS`, and its place in `charter.pipeline.plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.core.errors import CharterError
from charter.roles import BackendPool, RoleSpec


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


def _paths(**named: str | None) -> dict[str, Path]:
    return {k: Path(v) for k, v in named.items() if v is not None}


@dataclass(frozen=True)
class StageKind:
    """One kind of stage. `runner` stands in for `execute` (a fake stage on the real wiring,
    in tests); `trains`: a training stage (the runner frees loaded models before it)."""

    config: str  # "module:Class" of the stage's config dataclass
    wired: tuple[str, ...]  # keys the runner fills (a section may not set them)
    trains: bool = False
    runner: Callable[[Any, Context], dict] | None = None

    def inputs(self, cfg: Any) -> dict[str, Path]:
        """What the stage reads that an earlier stage (or the runner's data split) wrote."""
        return {}

    def outputs(self, cfg: Any) -> dict[str, Path]:
        """What the stage leaves for the stages after it (checked once it finished)."""
        return {}

    def before(self, run_dir: Path, name: str) -> None:
        """Called just before the stage named `name` runs into `run_dir / name`."""

    def run(self, cfg: Any, ctx: Context) -> dict:
        return (self.runner or self.execute)(cfg, ctx)

    def execute(self, cfg: Any, ctx: Context) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no execute")


class CritiqueStage(StageKind):
    def inputs(self, cfg):
        return _paths(prompts=cfg.prompts, helpful_prompts=cfg.helpful_prompts)

    def outputs(self, cfg):
        return _paths(sft=str(Path(cfg.out) / "sft.jsonl"))

    def execute(self, cfg, ctx: Context) -> dict:
        from critique.revise.run import run_critique

        manifest = run_critique(cfg, backend=ctx.backend("policy"),
                                teacher_backend=ctx.backend("teacher"))
        counts = manifest.get("counts") or {}
        if not counts.get("sft_examples"):
            raise CharterError(f"critique wrote no SFT examples ({counts.get('flagged', 0)} "
                               f"records flagged: {counts.get('flagged_by_reason')}); see the "
                               "records: larger max_new_tokens, other few-shot examples or "
                               "another model", path=Path(cfg.out) / "records.jsonl")
        return {"counts": counts}


@dataclass(frozen=True)
class TrainStage(StageKind):
    """SFT or DPO: `train` is the "module:function" that trains and returns the final model."""

    train: str = ""
    trains: bool = True

    def inputs(self, cfg):
        return _paths(data=cfg.data, model=cfg.model)

    def outputs(self, cfg):
        return _paths(model=str(Path(cfg.out) / "final"))

    def execute(self, cfg, ctx: Context) -> dict:
        import importlib

        from critique.evaluate.report import read_metrics

        module, name = self.train.split(":")
        final = getattr(importlib.import_module(module), name)(cfg)
        rows = read_metrics(cfg.out)
        last = {k: v for k, v in (rows[-1] if rows else {}).items() if isinstance(v, float)}
        return {"final_model": str(final), "steps": rows[-1].get("step") if rows else None,
                "last_metrics": last}


class LabelStage(StageKind):
    def inputs(self, cfg):
        return _paths(prompts=cfg.prompts, pairs=cfg.pairs, policy=cfg.policy)

    def outputs(self, cfg):
        return _paths(pairs=str(Path(cfg.out) / ("labels.jsonl" if cfg.pairs
                                                 else "pairs.jsonl")))

    def execute(self, cfg, ctx: Context) -> dict:
        from critique.label.run import run_label

        report = run_label(cfg, backend=ctx.backend("labeler"),
                           policy_backend=ctx.backend("policy"),
                           second_backend=ctx.backend("second_labeler"))
        if not report.get("n"):
            raise CharterError("labelling made no preference pairs (every prompt's samples "
                               "were identical or failed); raise temperature or samples",
                               path=Path(cfg.out) / "pairs.jsonl")
        keep = ("counts", "diagnostics", "relabel")
        return {k: v for k, v in report.items() if isinstance(v, (int, float)) or k in keep}


class EvalStage(StageKind):
    def inputs(self, cfg):
        return _paths(prompts=cfg.prompts, model=cfg.model, sft_model=cfg.sft_model)

    def outputs(self, cfg):
        return _paths(report=str(Path(cfg.out) / "report.json"))

    def before(self, run_dir: Path, name: str) -> None:
        """Later evals compare against the same starting model: reuse its greedy responses
        (eval keys them by model, prompt and token budget, so nothing stale is used)."""
        import shutil

        target = run_dir / name / "responses-baseline.jsonl"
        for src in sorted(run_dir.glob("eval*/responses-baseline.jsonl")):
            if src != target and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)

    def execute(self, cfg, ctx: Context) -> dict:
        from charter.core.models import resolve_model
        from critique.evaluate.run import run_eval
        from training.cards import add_to_card

        # loaded when the eval reaches each role, freed when done with it (one model at a time)
        backends = {role: (lambda r=role: ctx.backend(r)) for role in ctx.roles}
        headline = eval_headline(run_eval(cfg, backends, release=ctx.release))
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
    "critique": CritiqueStage("critique.revise.run:CritiqueConfig",
                              ("constitution", "prompts", "helpful_prompts", "out", "model",
                               "teacher")),
    "sft": TrainStage("training.options:SFTConfig", ("data", "out", "model"),
                      train="training.sft:train_sft"),
    "label": LabelStage("critique.label.run:LabelConfig",
                        ("constitution", "prompts", "pairs", "policy", "labeler",
                         "second_labeler", "out")),
    "dpo": TrainStage("training.options:DPOConfig", ("data", "out", "model"),
                      train="training.dpo:train_dpo"),
    "eval": EvalStage("critique.evaluate.run:EvalConfig",
                      ("model", "baseline", "sft_model", "prompts", "harmful", "benign", "out",
                       "judge", "judge_backend", "constitution", "metrics")),
}
