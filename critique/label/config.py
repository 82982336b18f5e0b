"""Settings of `charter label` (`LabelConfig`), and which of them a resumed run may change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from charter.core.errors import CharterError
from critique.backends.options import HOW_ONLY, BackendSettings, backend_kwargs
from critique.preference.score import CompareSettings


@dataclass(kw_only=True)
class LabelConfig(BackendSettings, CompareSettings):
    """Settings of `charter label`; the backend settings (backend, dtype, base_url, ...) come
    from `BackendSettings` and apply to both models (policy and labeller); how a comparison is
    asked and read (few_shot, cot, clamps) from `CompareSettings`."""

    constitution: str
    """Principle file (YAML) whose preference principles ask the questions."""
    out: str
    """Output directory (labels.jsonl or pairs.jsonl, report.json, config.json)."""
    prompts: str | None = None
    """Prompts (JSONL/CSV) to sample responses for from the policy: prompts mode."""
    pairs: str | None = None
    """Pairs to label (JSONL: id, prompt, response_a, response_b, preferred?): pairs mode."""
    prompt_field: str | None = None
    """Field holding the prompt in --prompts records (default: prompt, messages, ...)."""
    policy: str | None = None
    """Model that writes the responses in prompts mode (None: the embedded default)."""
    labeler: str | None = None
    """Model that labels (None: the policy, or the embedded default when there is none)."""
    mode: Literal["compare", "rate"] = "compare"
    """compare: A/B question read in both orders; rate: 1-10 rating of each response."""
    samples: int = 2
    """Responses sampled per prompt (K >= 2) in prompts mode."""
    pairs_per_prompt: int | None = None
    """Compare mode: label this many of the K(K-1)/2 pairs per prompt (seeded); None: all."""
    principles_per_pair: int = 4
    """Preference principles drawn per pair (seeded); their labels are averaged."""
    min_margin: float = 0.1
    """Pairs with |p_chosen - 0.5| below this are kept but marked low_margin."""
    rate_rejected: Literal["worst", "random"] = "worst"
    """Rate mode: the rejected response is the lowest rated, or (random) a seeded draw among
    those rated below the best, as UltraFeedback binarised its K = 4 samples."""
    relabel_below: float = 0.0
    """Pairs with |p_chosen - 0.5| below this are labelled again before DPO by the second
    labeller (`second_labeler`), or by the labeller with chain of thought when there is none;
    the second label replaces the first (kept in `first_label`). 0: off."""
    second_labeler: str | None = None
    """Model that relabels low-margin pairs (same backend); None: the labeller with CoT."""
    min_rating_gap: float = 1.0
    """Rate mode: best-vs-worst pairs with a smaller rating gap are marked low_margin."""
    temperature: float = 0.8
    """Sampling temperature of the policy's responses (> 0, so the K samples differ)."""
    top_p: float = 0.95
    """Nucleus sampling mass of the policy's responses."""
    max_new_tokens: int = 256
    """Length limit of each sampled response."""
    seed: int = 0
    """Seed for response sampling and principle draws."""
    limit: int | None = None
    """Use only the first N prompts or pairs."""
    batch_size: int = 8
    """Prompts or pairs per chunk: one generate and one score call each, then appended (also
    the transformers backend's forward batch)."""
    progress: bool = True
    """Show tqdm progress bars."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad input records: raise, or skip them (counted in report.json's input_errors)."""

    def validate(self) -> None:
        if bool(self.prompts) == bool(self.pairs):
            raise CharterError("give exactly one of --prompts (sample and label) or --pairs "
                               "(label given pairs)", field="prompts")
        if self.pairs and self.policy:
            raise CharterError("--policy samples responses in prompts mode; with --pairs the "
                               "responses are given (use --labeler to pick the labeller)",
                               field="policy")
        checks = [
            (self.samples >= 2, "samples", "must be at least 2 (pairs need two responses)"),
            (self.principles_per_pair >= 1, "principles_per_pair", "must be at least 1"),
            (self.pairs_per_prompt is None or self.pairs_per_prompt >= 1, "pairs_per_prompt",
             "must be at least 1"),
            (self.few_shot >= 0, "few_shot", "must be 0 or more"),
            (0.0 <= self.clamp_low <= 0.5 <= self.clamp_high <= 1.0, "clamp_low",
             "need 0 <= clamp_low <= 0.5 <= clamp_high <= 1"),
            (0.0 <= self.min_margin <= 0.5, "min_margin", "must be in [0, 0.5]"),
            (0.0 <= self.relabel_below <= 0.5, "relabel_below", "must be in [0, 0.5]"),
            (not (self.relabel_below and self.mode == "rate"), "relabel_below",
             "relabelling low-margin pairs is for --mode compare"),
            (self.min_rating_gap >= 0, "min_rating_gap", "must be 0 or more"),
            (self.limit is None or self.limit >= 1, "limit", "must be at least 1"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
            (self.max_new_tokens >= 1 and self.cot_max_new_tokens >= 1, "max_new_tokens",
             "must be at least 1"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (not (self.prompts and self.temperature <= 0), "temperature",
             "must be > 0 in prompts mode: greedy decoding gives K identical responses"),
            (not (self.cot and self.mode == "rate"), "cot",
             "chain of thought is for --mode compare"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise CharterError(msg, field=name)
        backend_kwargs(self)  # server settings given with a local backend, ... (fail early)

    @property
    def labeler_model(self) -> str | None:
        return self.labeler if self.labeler is not None else self.policy


# Settings that change what is written; a resumed run must match them (limit, batch_size and
# out may differ).
RESUME_FREE = ("out", "limit", "progress", "on_error", *HOW_ONLY)
# Settings that name files or models: compared by place, so a moved run folder resumes.
PATH_SETTINGS = ("constitution", "prompts", "pairs", "policy", "labeler", "second_labeler",
                 "tokenizer")
