"""Where training metrics go besides out/metrics.jsonl: `report_to` (as in TRL), through
accelerate's trackers.

- `tensorboard`: out/charter-<stage>/ (needs the tensorboard package);
- `wandb`: a W&B run in project charter-<stage> (needs wandb: pip install 'charter[wandb]');
- `csv`: out/metrics.csv, one row per logged step (a tracker of our own, `CSVTracker`).
Metric names are TRL's (`loss`, `rewards/chosen`, `rewards/margins`, ...), the same in every
tracker. None by default.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from charter.core.errors import CharterError

REPORT_TO = ("tensorboard", "wandb", "csv")
NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
         "wandb": ("wandb", "pip install 'charter[wandb]' (or pip install wandb)")}


def _tracker_base():
    from accelerate.tracking import GeneralTracker

    return GeneralTracker


class CSVTracker(_tracker_base()):
    """out/metrics.csv. Columns grow when a new metric appears (the file is rewritten then);
    a resumed run drops the rows from its first logged step on, so no step appears twice."""

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []
        self.columns: list[str] = []
        self.first = True
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [dict(r) for r in reader]

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        pass  # the resolved config is in train_config.json already

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        row = {"step": step, **values}
        rewrite = False
        if self.first:  # resume: forget rows at or past the first step logged now
            self.first = False
            keep = [r for r in self.rows if step is None or int(float(r["step"])) < step]
            rewrite = len(keep) != len(self.rows) or not self.path.exists()
            self.rows = keep
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            rewrite = True
        self.rows.append(row)
        if rewrite:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
            from charter.core.records import write_text_atomic

            write_text_atomic(self.path, buf.getvalue())
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)


def log_with(report_to: list[str], out: str | Path) -> list:
    """accelerate's `log_with` for `report_to`; a missing package is a CharterError naming
    what to install."""
    names = [n for n in report_to if n != "none"]
    got = []
    for n in dict.fromkeys(names):
        if n not in REPORT_TO:
            raise CharterError(f"unknown tracker {n!r}; expected none or {', '.join(REPORT_TO)}",
                               field="report_to")
        if n in NEEDS:
            module, how = NEEDS[n]
            try:
                __import__(module)
            except ImportError:
                raise CharterError(f"{n} needs the {module} package, which is not installed: "
                                   f"{how}", field="report_to") from None
            got.append(n)
        else:
            got.append(CSVTracker(Path(out) / "metrics.csv"))
    return got


def start_trackers(acc, cfg_dict: dict, stage: str) -> None:
    """Start the trackers (project charter-<stage>) with the run's settings as hyperparameters."""
    flat = {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in cfg_dict.items()}
    acc.init_trackers(f"charter-{stage}", config=flat)
