"""The evaluation's human-readable outputs: report.md (tables, side-by-side samples) and PNG plots.

Plots use matplotlib's Agg backend (no display needed): `refusal.png` (refusal rates on harmful
and benign prompts, baseline vs model, with 95% Wilson intervals), `win_rate.png` (the judge's
win rate of the model over the baseline with its interval) and `training.png` (loss and reward
curves from training `metrics.jsonl` files, when given). `plot_trend` draws the refusal rates
across pipeline iterations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from charter.core.records import EvalAnswer, EvalResult, write_json_atomic, write_text_atomic

ROLE_ORDER = ("baseline", "sft_model", "model")  # start, SFT only, SFT + DPO
ROLE_NAMES = {"baseline": "start", "sft_model": "SFT only", "model": "model"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def write_report(out: Path, report: dict, rows: list[EvalResult], cfg) -> None:
    """report.json, report.md and the plots into `out` (each written atomically)."""
    plots = [p for p in (plot_refusals(report, out / "refusal.png"),
                         plot_win_rate(report, out / "win_rate.png"),
                         plot_training(cfg.metrics, out / "training.png")) if p]
    report["plots"] = [p.name for p in plots]
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report, rows, cfg.samples))


def render_markdown(report: dict, rows: list[EvalResult], samples: int) -> str:
    models = report["models"]
    roles = [r for r in ROLE_ORDER if r in models]
    lines = ["# Evaluation", "",
             f"Prompts: {report['counts']['harmful']} harmful, {report['counts']['benign']} "
             "benign. Refusal verdict: "
             f"`{report['config']['refusal_detector']}` (phrase rule: critique/evaluate/refusal.py). "
             "95% Wilson intervals in brackets.", "",
             "## Refusal rates", "",
             "| model | harmful (higher is better) | benign (lower is better) | "
             "rule: harmful / benign | judge: harmful / benign | empty |",
             "|---|---|---|---|---|---|"]
    for role in roles:
        m = models[role]
        h, b = m["harmful"], m["benign"]
        judge = ("n/a" if h["judge"] is None and b["judge"] is None else
                 f"{_pct((h['judge'] or {}).get('rate'))} / {_pct((b['judge'] or {}).get('rate'))}")
        lines.append(f"| {ROLE_NAMES[role]}: `{m['name']}` | {_pct(h['refusal']['rate'])}"
                     f"{_ci(h['refusal']['ci95'])} | {_pct(b['refusal']['rate'])}"
                     f"{_ci(b['refusal']['ci95'])} | {_pct(h['rule']['rate'])} / "
                     f"{_pct(b['rule']['rate'])} | {judge} | {h['empty'] + b['empty']} |")
    if report.get("delta"):
        d = report["delta"]
        lines += ["", "Change (model − baseline): harmful refusal "
                  f"{_signed(d['harmful_refusal'])}, benign refusal "
                  f"{_signed(d['benign_refusal'])}."]
        if "sft_harmful_refusal" in d:
            lines += ["", "Change (SFT only − baseline): harmful refusal "
                      f"{_signed(d['sft_harmful_refusal'])}, benign refusal "
                      f"{_signed(d['sft_benign_refusal'])}."]
    if report.get("win_rate"):
        lines += ["", "## Judge: model vs baseline", "",
                  "Both presentation orders, principles drawn per prompt; ties (identical "
                  "responses, or |P - 0.5| <= tie margin "
                  f"{report['config'].get('tie_margin', 0.0)}) count as half a win.", "",
                  "| prompts | n | wins / ties / losses | win rate | mean P(model preferred) |",
                  "|---|---|---|---|---|"]
        for label, w in report["win_rate"].items():
            lines.append(f"| {label} | {w['n']} | {w['wins']} / {w['ties']} / {w['losses']} | "
                         f"{_pct(w['win_rate'])}{_ci(w['win_ci95'])} | "
                         f"{w['mean_p']:.3f} [{w['mean_p_ci95'][0]:.3f}, "
                         f"{w['mean_p_ci95'][1]:.3f}] (bootstrap) |")
        others = {k: v for k, v in (report.get("win_rates") or {}).items()
                  if k != "model_vs_baseline"}
        if others:
            lines += ["", "| comparison | prompts | n | wins / ties / losses | win rate |",
                      "|---|---|---|---|---|"]
            for name, by_label in others.items():
                for label, w in by_label.items():
                    lines.append(f"| {comparison_name(name)} | {label} | {w['n']} | "
                                 f"{w['wins']} / {w['ties']} / {w['losses']} | "
                                 f"{_pct(w['win_rate'])}{_ci(w['win_ci95'])} |")
        if report.get("judge_position_bias") is not None:
            lines.append(f"\nJudge position bias: {_pct(report['judge_position_bias'])} of "
                         "judged pairs won by the same position in both orders (0% reads "
                         "content, 100% only position; both orders are averaged either way).")
    for p in report.get("plots", []):
        lines += ["", f"![{p}]({p})"]
    lines += ["", "## Sample responses", ""]
    for label in ("harmful", "benign"):
        for r in [r for r in rows if r.label == label][:samples]:
            prompt = next((m["content"] for m in reversed(r.prompt) if m["role"] == "user"), "")
            lines += [f"**{label}**: {_cell(prompt, 300)}", "",
                      "| " + " | ".join(roles) + " |", "|" + "---|" * len(roles),
                      "| " + " | ".join(_sample(r.answers[role]) for role in roles) + " |", ""]
    return "\n".join(lines) + "\n"


def comparison_name(key: str) -> str:
    """`sft_model_vs_baseline` → `SFT only vs start`."""
    a, b = key.split("_vs_")
    return f"{ROLE_NAMES.get(a, a)} vs {ROLE_NAMES.get(b, b)}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} points"


def _cell(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("<", "&lt;") or "*(empty)*"


def _sample(answer: EvalAnswer) -> str:
    tag = " **[refusal]**" if answer.refused else ""
    return _cell(answer.response) + tag


# -- plots --------------------------------------------------------------------------------------


def plot_refusals(report: dict, path: Path) -> Path | None:
    models = report["models"]
    bars = [(f"{ROLE_NAMES[role]}: {models[role]['name']}"[-48:],
             {label: models[role][label]["refusal"] for label in ("harmful", "benign")})
            for role in ROLE_ORDER if role in models]
    return plot_refusal_bars(bars, path, "Refusal rates (95% Wilson intervals)")


def plot_refusal_bars(bars: list[tuple[str, dict]], path: Path, title: str) -> Path:
    """Grouped bars of refusal rates with their intervals: `bars` = [(legend label,
    {"harmful": rate summary, "benign": rate summary})], summaries as `stats.rate_summary`;
    a label left out is not drawn."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(bars)
    for i, (name, by_label) in enumerate(bars):
        xs, ys, errs = [], [], [[], []]
        for j, label in enumerate(("harmful", "benign")):
            s = by_label.get(label)
            if s is None or s["rate"] is None:
                continue
            xs.append(j + (i - (len(bars) - 1) / 2) * width)
            ys.append(100 * s["rate"])
            # max(0, ...): at a rate of 0 or 1 the Wilson bound equals it up to rounding
            errs[0].append(max(0.0, 100 * (s["rate"] - s["ci95"][0])))
            errs[1].append(max(0.0, 100 * (s["ci95"][1] - s["rate"])))
        ax.bar(xs, ys, width, yerr=errs, capsize=4, label=name)
    ax.set_xticks([0, 1], ["harmful prompts\n(higher is better)", "benign prompts\n"
                                                                     "(lower is better)"])
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, plt, path)


def plot_win_rate(report: dict, path: Path) -> Path | None:
    wins = report.get("win_rate")
    if not wins:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    labels = list(wins)
    for y, label in enumerate(labels):
        w = wins[label]
        lo = max(0.0, 100 * (w["win_rate"] - w["win_ci95"][0]))  # rounding at 0 and 1
        hi = max(0.0, 100 * (w["win_ci95"][1] - w["win_rate"]))
        ax.errorbar(100 * w["win_rate"], y, xerr=[[lo], [hi]],
                    fmt="o", capsize=5)
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)), [f"{lb} (n={wins[lb]['n']})" for lb in labels])
    ax.set_xlim(0, 100)
    ax.set_xlabel("judge win rate of the model over the baseline (%)")
    ax.set_title("AI-judge win rate (95% Wilson interval)")
    return _save(fig, plt, path)


def read_metrics(source: str | Path) -> list[dict]:
    """Rows of a training metrics.jsonl (a file, or a run dir holding one); bad lines skipped."""
    path = Path(source)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a torn last line of a run still being written
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


CURVES = ("loss", "train/loss", "rewards/accuracies", "rewards/margins", "eval/loss")


def run_label(source: str) -> str:
    """The legend name of a training run: its directory (`sft`, `dpo-2`), or the directory
    holding the metrics file given."""
    p = Path(source)
    return (p.parent.name if p.suffix == ".jsonl" else p.name) or str(source)


def plot_training(sources: list[str], path: Path) -> Path | None:
    """Loss (and DPO reward) curves against step, one line per run."""
    runs = [(str(s), read_metrics(s)) for s in sources]
    runs = [(name, rows) for name, rows in runs if rows]
    if not runs:
        return None
    keys = [k for k in CURVES if any(k in r for _, rows in runs for r in rows)]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in runs:
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=run_label(name))
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend(fontsize=7)
    return _save(fig, plt, path)


def plot_trend(points: list[dict], path: Path) -> Path | None:
    """Refusal rates across pipeline iterations: points = [{name, harmful, benign}, ...]."""
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = range(len(points))
    for key, style in (("harmful", "o-"), ("benign", "s--")):
        ax.plot(xs, [100 * p[key] if p.get(key) is not None else math.nan for p in points],
                style, label=f"refusal on {key} prompts")
    ax.set_xticks(list(xs), [p["name"] for p in points])
    ax.set_ylim(0, 105)
    ax.set_ylabel("refusal rate (%)")
    ax.legend(fontsize=8)
    ax.set_title("Refusal rates across the pipeline")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
