"""Where a finished `charter run` spent its time, stage by stage, against this machine's peak.

    python benchmarks/quickstart_profile.py runs/quick            # the quickstart's run folder
    python benchmarks/quickstart_profile.py runs/quick --threads 2 --peak-seconds 5

For each stage of the run folder (iteration 0 and 1 of the quickstart's pipeline): its seconds
(summary.json), the work it did, read from the run's own records (tokens run forward, trained
or scored), its arithmetic at 2 x parameters FLOPs per token forward, 6 x per trained token
(8 x with gradient checkpointing: one more forward) and a reference pass over DPO's tokens, and
the floor: that arithmetic at the matmul peak of the precision the stage computed in, measured
here (a 2048 x 2048 matmul, fp32 and bf16, `--threads` threads). Attention and everything that
is not a matmul are left out of the arithmetic, so the floor is below what any implementation
could reach. `measured / floor` says how far each stage is from its floor.

Generation is a special case: a decode step reads every weight to make one token per row, so
at small batches it is bound by memory bandwidth and per-step overhead, not arithmetic; its
floor here is the arithmetic one all the same (the lowest line a faster loop could aim at).

The last line is one JSON object: per stage seconds, GFLOP, floor seconds, ratio; and the
peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def n_params(model: str) -> int:
    """Parameters of a model folder's safetensors weights (a tied embedding is stored once,
    and is the LM head's matmul)."""
    from safetensors import safe_open

    from charter.core.models import resolve_model

    total = 0
    for f in sorted(Path(resolve_model(model)).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def trained_tokens(folder: Path) -> float:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return sum(r["tokens_per_s"] * r["elapsed_s"] for r in rows if "tokens_per_s" in r)


def forward_tokens(usage: dict) -> float:
    """Tokens a backend ran forward: prompts less cached prefixes, generated tokens, scored
    rows less prefixes shared within a batch."""
    return (usage.get("prompt_tokens", 0) - usage.get("reused_prompt_tokens", 0)
            + usage.get("generated_tokens", 0) + usage.get("scored_tokens", 0)
            - usage.get("shared_score_tokens", 0))


def stage_work(run: Path, stage: dict, N: int) -> tuple[float | None, str, str]:
    """(GFLOP, precision, what) of one stage from its records; None where they lack counts."""
    d = Path(stage["dir"])
    if not d.is_absolute() or not d.exists():
        d = run / Path(stage["dir"]).name
    kind = stage["kind"]
    if kind == "critique":
        u = json.loads((d / "manifest.json").read_text())["backend_usage"]
        t = forward_tokens(u)
        return 2 * N * t / 1e9, "fp32", f"{t:,.0f} tokens forward (generation)"
    if kind in ("sft", "dpo"):
        cfg = json.loads((d / "train_config.json").read_text())
        t = trained_tokens(d)
        per = 8 if cfg.get("gradient_checkpointing") else 6
        flops = per * N * t + (2 * N * t if kind == "dpo" else 0)  # + DPO's reference pass
        prec = "bf16" if cfg.get("precision", "fp32").startswith("bf16") else "fp32"
        what = f"{t:,.0f} tokens trained ({per}N each" + (", + reference pass)" if kind == "dpo"
                                                           else ")")
        return flops / 1e9, prec, what
    if kind == "label":
        usage = json.loads((d / "report.json").read_text()).get("usage", {})
        t = sum(forward_tokens(u) for u in usage.values() if u)
        return 2 * N * t / 1e9, "fp32", f"{t:,.0f} tokens forward (samples + scoring)"
    if kind == "eval":
        work = json.loads((d / "report.json").read_text()).get("work")
        if not work:
            return None, "fp32", "no per-phase counts (an eval from before they were kept)"
        t = sum(forward_tokens(u) for u in work.values())
        return 2 * N * t / 1e9, "fp32", f"{t:,.0f} tokens forward (answers + judge)"
    return None, "fp32", "unknown stage kind"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder (with summary.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-seconds", type=float, default=4.0,
                    help="seconds spent measuring each matmul peak")
    args = ap.parse_args(argv)
    import torch

    from benchmarks.dpo_vs_trl import matmul_peak_flops

    torch.set_num_threads(args.threads)
    summary = json.loads((args.run / "summary.json").read_text())
    N = n_params(summary["roles"]["policy"]["model"])
    peaks = {"fp32": matmul_peak_flops("float32", args.peak_seconds) / 1e9,
             "bf16": matmul_peak_flops("bfloat16", args.peak_seconds) / 1e9}
    print(f"model parameters: {N / 1e6:.1f}M; matmul peak ({args.threads} threads): "
          f"fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(f"{'stage':<10} {'seconds':>8} {'GFLOP':>9} {'prec':>5} {'floor s':>8} "
          f"{'x floor':>8}  work")
    out, total, floor_total = {}, 0.0, 0.0
    for st in summary["stages"]:
        gflop, prec, what = stage_work(args.run, st, N)
        sec = float(st.get("seconds") or 0.0)
        floor = gflop / peaks[prec] if gflop is not None else None
        total += sec
        floor_total += floor or 0.0
        ratio = sec / floor if floor else None
        print(f"{st['name']:<10} {sec:>8.0f} {gflop or 0:>9,.0f} {prec:>5} "
              f"{floor or 0:>8.0f} {ratio or 0:>8.2f}  {what}")
        out[st["name"]] = {"seconds": round(sec, 1), "gflop": round(gflop or 0, 1),
                           "precision": prec, "floor_s": round(floor, 1) if floor else None,
                           "x_floor": round(ratio, 2) if ratio else None, "work": what}
    print(f"{'total':<10} {total:>8.0f} {'':>9} {'':>5} {floor_total:>8.0f} "
          f"{total / floor_total if floor_total else 0:>8.2f}")
    print(json.dumps({"stages": out, "total_s": round(total, 1),
                      "floor_total_s": round(floor_total, 1),
                      "peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
                      "params": N, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
