"""Settings of `charter eval` (`EvalConfig`), the backend description of each role it runs
(`backend_specs`: the model evaluated, its baseline, the SFT model and the judge) and the
settings its run folder must match to resume (`resume_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from charter.core.errors import CharterError
from critique.backends.options import (
    HOW_ONLY,
    BackendSettings,
    BackendSpec,
    backend_kwargs,
    spec_of,
)


@dataclass(kw_only=True)
class EvalConfig(BackendSettings):
    """Settings of `charter eval`; the backend settings (backend, dtype, base_url, ...) come
    from `BackendSettings` and apply to the model, the baseline and (unless `judge_backend`
    names another backend) the judge."""

    model: str | None = None
    """Model to evaluate: a model dir, a training run dir (its final/), a hub id; None: embedded."""
    baseline: str | None = None
    """Model to compare against (e.g. the starting model); None: evaluate `model` alone."""
    sft_model: str | None = None
    """An intermediate model evaluated too (the SFT-only model), so the report compares three:
    baseline, SFT only, and `model` (SFT + DPO), each judged against the ones before it."""
    prompts: str | None = None
    """Prompts with a `label` field (harmful/unsafe or benign/safe): JSONL, .jsonl.gz or CSV."""
    harmful: str | None = None
    """A file of harmful prompts (instead of a labelled `prompts` file)."""
    benign: str | None = None
    """A file of benign prompts (instead of a labelled `prompts` file)."""
    prompt_field: str | None = None
    """Field holding the prompt (default: prompt, messages, chosen, instruction or question)."""
    out: str
    """Output directory for report.json, report.md, results.jsonl and plots."""
    judge: str | None = None
    """Judge model for the win rate and the refusal verdict (None: no judge; smollm2: embedded)."""
    constitution: str | None = None
    """Principle file whose preference principles the judge uses (required for a win rate)."""
    judge_backend: str | None = None
    """Backend kind for the judge (None: the same backend and settings as the models; another
    kind runs the judge locally with `dtype`, `batch_size` and `trust_remote_code`)."""
    max_new_tokens: int = 256
    """Token budget of each greedy response."""
    batch_size: int = 8
    """Conversations per backend call (also the transformers backend's forward batch)."""
    seed: int = 0
    """Seed for principle draws and the bootstrap."""
    limit: int | None = None
    """Use at most this many prompts of each kind (harmful, benign)."""
    judge_principles: int = 2
    """Preference principles drawn per prompt for the judge (0: all of them)."""
    tie_margin: float = 0.0
    """Judged pairs with |P(model preferred) - 0.5| <= this count as ties (a weak judge's noise)."""
    judge_few_shot: int = 3
    """Labelling examples from the principle file shown to the judge before each question."""
    refusal_detector: Literal["rule", "judge", "either"] = "rule"
    """Headline refusal verdict: the phrase rule, the judge (P(yes) > 0.5), or either."""
    samples: int = 4
    """Sample responses of each kind shown side by side in report.md."""
    bootstrap: int = 1000
    """Bootstrap resamples for the mean preference probability's interval."""
    metrics: list[str] = field(default_factory=list)
    """Training metrics.jsonl files (or run dirs holding one) to plot as training curves."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad prompt records: raise, or skip them (counted in report.json's input_errors)."""

    def validate(self) -> None:
        if self.prompts and (self.harmful or self.benign):
            raise CharterError("give either --prompts (labelled) or --harmful/--benign, not both",
                               field="prompts")
        if not (self.prompts or self.harmful or self.benign):
            raise CharterError("no prompts: give --prompts (labelled) or --harmful/--benign",
                               field="prompts")
        if self.refusal_detector != "rule" and not self.judge:
            raise CharterError(f"refusal_detector {self.refusal_detector!r} needs a --judge",
                               field="refusal_detector")
        if self.judge and self.baseline is not None and not self.constitution:
            raise CharterError("a judged win rate needs --constitution (its preference "
                               "principles)", field="constitution")
        for name in ("max_new_tokens", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise CharterError("must be at least 1", field=name)
        if not 0.0 <= self.tie_margin < 0.5:
            raise CharterError("must be in [0, 0.5)", field="tie_margin")
        if self.judge_few_shot < 0:
            raise CharterError("must be 0 or more", field="judge_few_shot")
        if self.judge_principles < 0:
            raise CharterError("must be 0 (all) or more", field="judge_principles")
        backend_specs(self)  # server settings given with a local backend, ... (fail early)


def backend_specs(cfg: EvalConfig) -> dict[str, BackendSpec]:
    """The backend of each role: "model", "baseline" and "sft_model" (when given), "judge"
    (when given)."""
    specs = {"model": spec_of(cfg, cfg.model)}
    for role in ("baseline", "sft_model"):
        if getattr(cfg, role) is not None:
            specs[role] = spec_of(cfg, getattr(cfg, role))
    if cfg.judge:
        if cfg.judge_backend and cfg.judge_backend != cfg.backend:
            specs["judge"] = BackendSpec(backend=cfg.judge_backend, model=cfg.judge,
                                         dtype=cfg.dtype, batch_size=cfg.batch_size,
                                         trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
        else:
            specs["judge"] = spec_of(cfg, cfg.judge)
    for role, spec in specs.items():
        backend_kwargs(spec, role)
    return specs


# Settings a resumed eval need not match: where it writes, how many prompts (each answer is
# keyed by its prompt), what to do with a bad prompt, and how models are reached or batched.
RESUME_FREE = ("out", "limit", "on_error", *HOW_ONLY)
# Settings that name files or models: compared by place, so a moved run folder resumes.
PATH_SETTINGS = ("model", "baseline", "sft_model", "prompts", "harmful", "benign", "judge",
                 "constitution", "metrics", "tokenizer")


def resume_settings(cfg: EvalConfig, constitution_sha256: str | None = None) -> dict:
    """What an eval folder records and a re-run into it must match: every setting that changes
    its answers, verdicts or report (models as their responses are keyed: no model is the
    embedded one), and the judge's principle file by content when a win rate is judged."""
    from charter.core.config import config_to_dict
    from charter.core.models import model_label

    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE}
    settings["model"] = model_label(cfg.model)
    if constitution_sha256 is not None:
        settings["constitution_sha256"] = constitution_sha256
    return settings
