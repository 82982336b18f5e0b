"""Log-prob labelling in bf16 against fp32: do the labels keep their winners?

    python benchmarks/label_dtype.py --data DIR --pairs 200     # DIR holds the HH-RLHF file
    python benchmarks/label_throughput.py --bf16-compare ...    # the same, inside that run

Same pairs, labelling conversations and scoring code as `label_throughput.py` (both orders,
one built-in harmlessness principle), the embedded SmolLM2 as labeller on the transformers
backend, three dtypes, each in a fresh backend: fp32 (the reference), bf16 with the final norm
and LM head in fp32 (`fp32_head`, critique/backends/head_precision.py) and plain bf16. For each
bf16 variant: the fraction of pairs whose winner (p_A > 0.5) is the fp32 winner, and the
distribution of |p_bf16 - p_fp32| (median, 90th percentile, max); for all: pairs/s, prompt
tokens/s run, and MFU (2 x parameters x tokens/s over the measured bf16 matmul peak). The rule
for the CPU default (issue #15): bf16 only if winners agree on >= 98% and the median |dp| <= 0.02.
Last line: one JSON object with "bf16_winner_agreement" (the fp32-head variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {"fp32": {"dtype": "float32"},
            "bf16_fp32_head": {"dtype": "bfloat16", "fp32_head": True},
            "bf16": {"dtype": "bfloat16", "fp32_head": False}}


def run_variant(model, options: dict, constitution, pairs, cfg) -> dict:
    from benchmarks.label_throughput import by_score
    from critique.backends import load_backend

    backend = load_backend("transformers", model, **options)
    by_score(backend, constitution, pairs[:1], cfg)  # warm-up
    run0 = backend.usage.prompt_tokens - backend.usage.reused_prompt_tokens
    t0 = time.perf_counter()
    labels = by_score(backend, constitution, pairs, cfg)
    dt = time.perf_counter() - t0
    ran = backend.usage.prompt_tokens - backend.usage.reused_prompt_tokens - run0
    params = sum(p.numel() for p in backend.model.parameters())
    backend.close()
    return {"p_a": [r["p_a"] for r in labels], "seconds": dt, "pairs_per_s": len(pairs) / dt,
            "prompt_tokens_per_s": ran / dt, "params": params}


def compare(model, constitution, pairs, cfg) -> dict:
    from benchmarks.dpo_vs_trl import matmul_peak_flops

    peak = matmul_peak_flops("bfloat16")
    res = {name: run_variant(model, opts, constitution, pairs, cfg)
           for name, opts in VARIANTS.items()}
    base = res["fp32"]["p_a"]
    out: dict = {"pairs": len(pairs), "bf16_peak_gflops": round(peak / 1e9, 1)}
    for name, r in res.items():
        out[f"{name}_pairs_per_s"] = round(r["pairs_per_s"], 4)
        out[f"{name}_prompt_tokens_per_s"] = round(r["prompt_tokens_per_s"], 1)
        out[f"{name}_mfu"] = round(2 * r["params"] * r["prompt_tokens_per_s"] / peak, 4)
        if name == "fp32":
            continue
        agree = sum((x > 0.5) == (y > 0.5) for x, y in zip(base, r["p_a"])) / len(base)
        dp = sorted(abs(x - y) for x, y in zip(base, r["p_a"]))
        out[f"{name}_winner_agreement"] = round(agree, 4)
        out[f"{name}_median_abs_dp"] = round(statistics.median(dp), 5)
        out[f"{name}_p90_abs_dp"] = round(dp[int(0.9 * (len(dp) - 1))], 5)
        out[f"{name}_max_abs_dp"] = round(dp[-1], 5)
        out[f"{name}_speedup_vs_fp32"] = round(res["fp32"]["seconds"] / r["seconds"], 3)
    out["bf16_winner_agreement"] = out["bf16_fp32_head_winner_agreement"]
    out["bf16_default_allowed"] = (out["bf16_fp32_head_winner_agreement"] >= 0.98
                                   and out["bf16_fp32_head_median_abs_dp"] <= 0.02)
    return out


def main() -> None:
    from benchmarks.label_throughput import CONSTITUTION, HH_FILE, load_pairs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data",
                    help=f"folder holding {HH_FILE}")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=900)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    from constitution import parse_constitution
    from critique.label.run import LabelConfig

    constitution = parse_constitution(CONSTITUTION, "<benchmark>")
    pairs = load_pairs(a.data / HH_FILE, a.pairs, a.max_chars)
    cfg = LabelConfig(constitution="-", pairs="-", out="-", principles_per_pair=1,
                      few_shot=0, batch_size=a.batch_size)
    print(json.dumps(compare(a.model, constitution, pairs, cfg)))


if __name__ == "__main__":
    main()
