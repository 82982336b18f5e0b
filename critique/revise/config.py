"""Settings of `charter critique` (`CritiqueConfig`), and the provenance that names every
setting that changes its outputs (part of each record id; checked on resume)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from charter.core.errors import CharterError
from charter.core.models import model_label
from constitution import Constitution
from critique.backends.base import Backend
from critique.backends.options import BackendSettings, backend_kwargs


@dataclass(kw_only=True)
class CritiqueConfig(BackendSettings):
    """Settings of `charter critique` (flags, or keys of a `--config` YAML file); the backend
    settings (backend, dtype, base_url, ...) come from `BackendSettings`."""

    model: str | None = None
    """Model that answers, critiques and revises: a model dir, a run dir, a hub id, or the
    served model name (openai); None: the embedded SmolLM2."""

    constitution: str
    """Principle file (YAML) whose critique/revision templates drive the loop."""
    prompts: str
    """Red-team prompts: JSONL (prompt / messages / HH-RLHF chosen / instruction), .gz or CSV."""
    out: str
    """Output directory: records.jsonl, sft.jsonl, pairs.jsonl, manifest.json."""
    rounds: int = 1
    """Critique-and-revise rounds per prompt (the paper uses up to 4)."""
    limit: int | None = None
    """Use only the first N prompts of the file."""
    seed: int = 0
    """Seed for principle draws, few-shot draws and sampling."""
    batch_size: int = 32
    """Prompts per chunk: each step sends one generate call for the whole chunk (also the
    transformers backend's forward batch; raise it with vllm/openai to keep servers busy)."""
    max_new_tokens: int = 256
    """Token limit of initial responses and revisions."""
    critique_max_new_tokens: int | None = None
    """Token limit of critiques; None = max_new_tokens."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    few_shot: int = 3
    """Few-shot examples from the principle file prepended to critiques and revisions (up to)."""
    helpful_prompts: str | None = None
    """Benign prompts answered plainly and mixed into sft.jsonl (so SFT does not teach refusal)."""
    helpful_limit: int | None = None
    """Use only the first N helpful prompts."""
    prompt_field: str | None = None
    """Field of the prompts file that holds the prompt (default: detected)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad prompt records: raise, or skip them (counted in the manifest)."""
    trust_ok_critiques: bool = True
    """A critique that says there is nothing to fix ends its round without a revision. Turn
    off to always ask for a revision, as the paper does: a weak critic (the embedded SmolLM2)
    also says "No" to harmful answers."""
    few_shot_changed_only: bool = False
    """Draw few-shot examples only among those whose revision changes the response (for
    red-team prompts; the unchanged ones teach "nothing to fix")."""
    mode: Literal["revise", "distill"] = "revise"
    """revise: the teacher critiques and revises the policy's answer under drawn principles
    (SL-CAI); distill: the teacher answers each prompt with the constitution (its description,
    principle traits and few-shot dialogues) in its context, and the SFT data is the plain prompt
    with that answer (context distillation, Zephyr's dSFT)."""
    teacher: str | None = None
    """Model that critiques and revises (or answers, mode distill), on the same backend; None:
    the policy itself (`model`), as in SL-CAI."""
    revision_prefix: str = ""
    """Text every revision starts with (the assistant turn is pre-filled with it and it is
    kept in the revision), e.g. "I'm sorry, but I can't" for a model too weak to revise on
    its own. Empty: the model writes the whole revision."""
    salvage: bool = True
    """A revision that degenerates (loops, drifts) keeps its clean opening sentences when
    there are any (`cleaning.salvage`), and a cut-off last sentence is dropped; else flagged."""
    progress: bool = True
    """Show tqdm progress bars."""

    def validate(self) -> None:
        positive = {"rounds": self.rounds, "batch_size": self.batch_size,
                    "max_new_tokens": self.max_new_tokens,
                    "critique_max_new_tokens": self.critique_max_new_tokens,
                    "limit": self.limit, "helpful_limit": self.helpful_limit}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise CharterError(f"must be at least 1, got {value}", field=name)
        if self.few_shot < 0:
            raise CharterError(f"must be 0 or more, got {self.few_shot}", field="few_shot")
        if self.temperature < 0:
            raise CharterError(f"must be 0 or more, got {self.temperature}",
                               field="temperature")
        if not 0 < self.top_p <= 1:
            raise CharterError(f"must be in (0, 1], got {self.top_p}", field="top_p")
        backend_kwargs(self)  # server settings given with a local backend, ... (fail early)


def provenance(cfg: CritiqueConfig, constitution: Constitution, backend: Backend | None,
               teacher: Backend | None = None) -> dict:
    """Every setting that changes outputs (part of each record id; checked on resume)."""
    prov = {
        "model": backend.model_name if backend is not None else model_label(cfg.model),
        "backend": backend.name if backend is not None else cfg.backend,
        "dtype": cfg.dtype,
        "backend_options": dict(cfg.backend_options),
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_new_tokens": cfg.max_new_tokens,
                     "critique_max_new_tokens": cfg.critique_max_new_tokens
                     or cfg.max_new_tokens},
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "few_shot": cfg.few_shot,
        "trust_ok_critiques": cfg.trust_ok_critiques,
        "few_shot_changed_only": cfg.few_shot_changed_only,
        "salvage": cfg.salvage,
        "revision_prefix": cfg.revision_prefix,
        "constitution": {"name": constitution.name, "sha256": constitution.sha256},
    }
    if teacher is not None or cfg.teacher is not None or cfg.mode != "revise":
        # the role that wrote the revisions (absent from records of older runs: same as model)
        prov["teacher"] = {"model": teacher.model_name if teacher is not None
                           else model_label(cfg.teacher or cfg.model),
                           "backend": teacher.name if teacher is not None else cfg.backend}
        prov["mode"] = cfg.mode
    return prov
