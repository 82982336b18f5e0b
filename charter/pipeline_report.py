"""The pipeline's summary: `DIR/summary.json` (machine-readable) and `DIR/report.md` (human).

summary.json: `pipeline` (the file), `out`, `roles` (role → model, backend and options: policy,
teacher, labeler, second_labeler, judge), `final_model` (the last finished model directory,
loadable with `AutoModelForCausalLM.from_pretrained`; null until one exists), `seconds`,
`stages` (in order: name, kind, iteration, dir, status pending|running|done|skipped|failed|
interrupted, seconds, result: counts and headline metrics, error), and `trend` (refusal rates of
the starting model and of each evaluated model). Both files are rewritten after every stage.
"""

from __future__ import annotations

from pathlib import Path

from charter.core.records import write_json_atomic, write_text_atomic


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def trend_points(stages, state: dict) -> list[dict]:
    """[{name, harmful, benign}] for the starting model, then each finished eval in order."""
    points: list[dict] = []
    for st in stages:
        res = state.get(st.name, {}).get("result") or {}
        if st.kind != "eval" or "model_harmful_refusal" not in res:
            continue
        if not points and "baseline_harmful_refusal" in res:
            points.append({"name": "start", "harmful": res["baseline_harmful_refusal"],
                           "benign": res["baseline_benign_refusal"]})
        label = "sft" if st.iteration == 0 else f"dpo-{st.iteration}"
        points.append({"name": label, "harmful": res["model_harmful_refusal"],
                       "benign": res["model_benign_refusal"], "win_rate_harmful":
                       res.get("win_rate_harmful"), "stage": st.name})
    return points


def final_model(stages, state: dict) -> str | None:
    for st in reversed(stages):
        res = state.get(st.name, {}).get("result") or {}
        if st.kind in ("sft", "dpo") and state[st.name]["status"] in ("done", "skipped") \
                and res.get("final_model"):
            return str(Path(res["final_model"]).resolve())
    return None


def roles_summary(pf) -> dict:
    """Every role's model, backend and options (start/policy named as such)."""
    from charter.core.models import model_label

    c = pf.cfg
    roles = {"policy": {"model": model_label(c.model), "backend": c.backend}}
    for name, spec in pf.roles.items():
        if spec is None:
            roles[name] = None
            continue
        d = spec.describe()
        if spec.model in ("start", "policy"):
            d["model"] = (model_label(c.model) + " (the starting model)" if spec.model == "start"
                          else "the policy (the newest model trained)")
        roles[name] = d
    return roles


def write_summary(out: Path, pf, stages, state: dict, seconds: float,
                  plot: bool = True) -> dict:
    from critique.evaluate.report import plot_trend

    points = trend_points(stages, state)
    summary = {
        "pipeline": str(pf.path), "out": str(out), "roles": roles_summary(pf),
        "final_model": final_model(stages, state),
        "iterations": pf.cfg.iterations, "seconds": round(seconds, 2),
        "stages": [{"name": st.name, "kind": st.kind, "iteration": st.iteration,
                    "dir": str(out / st.name), **state.get(st.name, {})} for st in stages],
        "trend": points,
    }
    out.mkdir(parents=True, exist_ok=True)
    trend_png = plot_trend(points, out / "trend.png") if plot else None
    has_trend = trend_png is not None or (out / "trend.png").exists()
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "report.md", render(summary, has_trend,
                                                _attribution(out) if plot else []))
    return summary


def _attribution(out: Path) -> list[str]:
    """The principle attribution section (critique/evaluate/attribution.py); a problem in the
    run's records is shown, never raised (the report is written on the way out of a run)."""
    from charter.core.errors import CharterError
    from critique.evaluate.attribution import attribution_section

    try:
        return attribution_section(out)
    except CharterError as e:
        return ["## Principles", "", f"Attribution could not be computed: {e}"]


def render(summary: dict, has_trend: bool, attribution: list[str] = ()) -> str:
    lines = ["# Charter pipeline report", "",
             f"Pipeline file: `{summary['pipeline']}`; output: `{summary['out']}`; "
             f"iterations: {summary['iterations']}; total time {summary['seconds']:.0f} s.", "",
             f"Final model: `{summary['final_model'] or 'not trained yet'}`", ""]
    lines += render_roles(summary.get("roles") or {}) + [
             "## Stages", "", "Peak memory: the process's resident memory at its highest during "
             "the stage (models, training state, caches, and what the libraries hold).", "",
             "| stage | status | seconds | peak memory (MB) | result |", "|---|---|---|---|---|"]
    for st in summary["stages"]:
        secs, peak = st.get("seconds"), (st.get("memory") or {}).get("peak_mb")
        lines.append(f"| {st['name']} | {st['status']} | "
                     f"{'' if secs is None else f'{secs:.0f}'} | "
                     f"{'' if peak is None else f'{peak:,}'} | {_result(st)} |")
    evals = [st for st in summary["stages"] if st["kind"] == "eval" and st.get("result")]
    if evals:
        lines += ["", "## Evaluation (held-out prompts)", "",
                  "| stage | harmful refusal: start → model | benign refusal: start → model | "
                  "judge win rate on harmful [95% CI] |", "|---|---|---|---|"]
        for st in evals:
            r = st["result"]
            ci = r.get("win_ci95_harmful")
            win = (f"{_pct(r.get('win_rate_harmful'))}"
                   + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""))
            lines.append(f"| [{st['name']}]({st['name']}/report.md) | "
                         f"{_pct(r.get('baseline_harmful_refusal'))} → "
                         f"{_pct(r.get('model_harmful_refusal'))} | "
                         f"{_pct(r.get('baseline_benign_refusal'))} → "
                         f"{_pct(r.get('model_benign_refusal'))} | {win} |")
    if evals:
        lines += render_comparison(evals[-1])
    labels = [st for st in summary["stages"] if st["kind"] == "label"
              and (st.get("result") or {}).get("diagnostics")]
    if labels:
        from critique.label.report import render_diagnostics

        for st in labels:
            lines += [""] + render_diagnostics(
                st["result"]["diagnostics"], f"## Label diagnostics ({st['name']})")
            if (Path(st["dir"]) / "margins.png").exists():
                lines += ["", f"![{st['name']} label margins]({st['name']}/margins.png)"]
    if attribution:
        lines += ["", *attribution]
    if has_trend:
        lines += ["", "![refusal rates across the pipeline](trend.png)"]
    for st in evals:
        for png in ("refusal.png", "win_rate.png", "training.png"):
            if (Path(st["dir"]) / png).exists():
                lines += ["", f"![{st['name']} {png}]({st['name']}/{png})"]
    return "\n".join(lines) + "\n"


def _result(st: dict) -> str:
    if st.get("error"):
        return "error: " + " ".join(st["error"].split())[:200].replace("|", "\\|")
    res = st.get("result") or {}
    parts = []
    for k, v in res.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.3g}")
        elif isinstance(v, (int, str)) and k != "final_model":
            parts.append(f"{k} {v}")
        elif isinstance(v, dict) and k == "counts":
            parts += [f"{kk} {vv}" for kk, vv in v.items() if isinstance(vv, (int, float))]
    return ", ".join(parts[:8]).replace("|", "\\|")


def render_roles(roles: dict) -> list[str]:
    lines = ["## Roles", "", "| role | model | backend | options |", "|---|---|---|---|"]
    for name, d in roles.items():
        if d is None:
            lines.append(f"| {name} | none | | |")
            continue
        opts = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("model", "backend"))
        lines.append(f"| {name} | `{d['model']}` | {d['backend']} | {opts} |")
    return lines + [""]


def render_comparison(st: dict) -> list[str]:
    """The three models side by side (start, SFT only, SFT + DPO) from the last eval."""
    r = st["result"]
    if "sft_model_harmful_refusal" not in r:
        return []
    lines = ["", f"## Start vs SFT only vs SFT + DPO ({st['name']})", "",
             "| | start | SFT only | SFT + DPO |", "|---|---|---|---|"]
    for label, what in (("harmful", "harmful: refusal (higher is better)"),
                        ("benign", "benign: refusal (lower is better)")):
        lines.append(f"| {what} | {_pct(r.get(f'baseline_{label}_refusal'))} | "
                     f"{_pct(r.get(f'sft_model_{label}_refusal'))} | "
                     f"{_pct(r.get(f'model_{label}_refusal'))} |")
    judged = [("SFT only vs start", "win_rate_sft_model_vs_baseline_harmful",
               "win_ci95_sft_model_vs_baseline_harmful"),
              ("SFT + DPO vs start", "win_rate_harmful", "win_ci95_harmful"),
              ("SFT + DPO vs SFT only", "win_rate_model_vs_sft_model_harmful",
               "win_ci95_model_vs_sft_model_harmful")]
    rows = [(n, r[k], r.get(c)) for n, k, c in judged if r.get(k) is not None]
    if rows:
        lines += ["", "| judge on harmful prompts | win rate [95% CI] |", "|---|---|"]
        lines += [f"| {n} | {_pct(w)}" + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")
                  + " |" for n, w, ci in rows]
    return lines


def card_roles(final: Path, roles: dict) -> None:
    """The final model's card gets the run's roles (formats' hook, `training.cards`): which
    model, on which backend, played each role."""
    from training.cards import add_to_card

    add_to_card(Path(final) / "README.md", roles={
        name: "none" if d is None else f"{d['model']} · {d['backend']}"
        for name, d in roles.items()})
