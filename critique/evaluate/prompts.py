"""The eval's prompts: harmful then benign, each labelled, each kind cut to `limit`."""

from __future__ import annotations

import dataclasses
from typing import Any

from charter.core.errors import CharterError
from charter.core.records import PromptItem, read_prompts


def load_eval_prompts(cfg: Any, errors: list[str] | None = None) -> list[PromptItem]:
    """Harmful then benign prompts, each kind cut to `limit`; every prompt must carry a label.
    Records skipped under `on_error="skip"` are reported in `errors`."""
    items: list[PromptItem] = []
    if cfg.prompts:
        items = read_prompts(cfg.prompts, cfg.prompt_field, cfg.on_error, errors)
        for it in items:
            if it.label is None:
                raise CharterError("missing label: evaluation prompts need label harmful/unsafe "
                                   "or benign/safe (or use --harmful/--benign files)",
                                   path=it.source.rsplit(":", 1)[0],
                                   line=int(it.source.rsplit(":", 1)[1]), field="label")
    for path, label in ((cfg.harmful, "harmful"), (cfg.benign, "benign")):
        if path:
            items += [dataclasses.replace(it, label=label)
                      for it in read_prompts(path, cfg.prompt_field, cfg.on_error, errors)]
    out: list[PromptItem] = []
    seen: set[tuple[str, str]] = set()
    for label in ("harmful", "benign"):
        kind = [it for it in items if it.label == label]
        for it in kind[: cfg.limit] if cfg.limit is not None else kind:
            if (label, it.id) not in seen:  # a prompt listed twice is evaluated once
                seen.add((label, it.id))
                out.append(it)
    return out
