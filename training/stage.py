"""What the SFT and DPO entry points share around their loops: opening the run folder,
resuming from the last checkpoint, and saving the final model with its card.

    run = open_run(cfg, "sft", loaded)             # folder checked, model loaded, config written
    ...                                            # tokenise; return early if already trained
    opt, sched, start, last, metrics = resume(run, total)
    ...                                            # the loop
    final = finish(run, metrics.rows, summary, total, plot_keys, title)

Functions, not a base class: each loop stays written out in full in its own module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charter.core.writable import check_output
from training import checkpoint as ckpt
from training.data import data_provenance
from training.loop import (
    MetricsLog,
    log,
    make_optimizer,
    plot_metrics,
    resolve_precision,
    setup,
)
from training.trackers import start_trackers


@dataclass
class Run:
    """One training run: its config (also as a dict, as written to train_config.json), stage
    name, output folder, the prepared accelerator, model, tokenizer, and the data's file."""

    cfg: Any
    stage: str
    out: Path
    cfg_dict: dict
    acc: Any
    model: Any
    tok: Any
    model_path: str
    data_path: Any


def open_run(cfg, stage: str, loaded) -> Run:
    """Check the output (writable, locked, not another run's folder) before any model loads,
    then load the model, write the run's settings and clear a partly written checkpoint.
    `loaded`: the data, already read (bad data fails before anything else)."""
    out = Path(cfg.out)
    note = resolve_precision(cfg)  # `auto` made concrete first: train_config.json records it
    cfg_dict = dataclasses.asdict(cfg)
    check_output(out)  # an output that cannot be written fails before any model loads
    ckpt.check_run_dir(out, cfg_dict, stage)  # and so does a folder holding another run
    acc, model, tok, model_path = setup(cfg)
    if note:
        log(acc, note)
    log(acc, f"data: {loaded.path}: {len(loaded.rows)} rows, {loaded.shape}")
    ckpt.prepare_run_dir(acc, out, cfg_dict, stage)
    if acc.is_main_process:
        ckpt.clean_partial(out)
    return Run(cfg, stage, out, cfg_dict, acc, model, tok, model_path, loaded.path)


def resume(run: Run, total: int):
    """Optimizer and schedule for `total` steps, the model prepared for the accelerator (it
    replaces `run.model`), the state of the last intact checkpoint loaded when there is one,
    trackers started, and the metrics log opened. Returns (opt, sched, start step, last
    checkpoint or None, metrics)."""
    acc, cfg = run.acc, run.cfg
    opt, sched = make_optimizer(run.model, cfg, total, acc.num_processes)
    run.model, opt = acc.prepare(run.model, opt)
    start, last = 0, ckpt.resume_point(run.out, lambda m: log(acc, m))
    if last is not None:
        start = ckpt.load_checkpoint(acc, run.model, opt, sched, last)
        log(acc, f"resuming from {last} (step {start} of {total})")
    if cfg.report_to:
        start_trackers(acc, run.cfg_dict, run.stage)
    return opt, sched, start, last, MetricsLog(acc, run.out, start)


def finish(run: Run, rows: list[dict], summary: dict, total: int, plot_keys: list[str],
           title: str) -> Path:
    """Plot the metrics, save out/final with its model card, end the trackers."""
    acc = run.acc
    if acc.is_main_process:
        plot_metrics(rows, plot_keys, run.out / "metrics.png", title)
    card = ckpt.model_card(run.stage, run.cfg_dict, data_provenance(run.data_path),
                           run.model_path, summary)
    final = ckpt.save_final(acc, run.model, run.tok, run.out, card, total, merge=run.cfg.merge)
    acc.end_training()
    log(acc, f"saved {final}")
    return final
