"""Log-prob labelling in bf16 against fp32: do the labels keep their winners?

    python benchmarks/label_dtype.py --pairs 200                 # the issue #15 measurement
    python benchmarks/label_throughput.py --agreement 200 ...    # the same, inside that run

Pairs as in `label_throughput.py` (HH-RLHF harmless test, examples/data), labelled as the label
stage labels them: the quickstart's principle file (principles/harmless.yaml, or
--constitution), `principles_per_pair` preference principles drawn per pair (seeded, as
`charter label` draws them), `few_shot` of the file's labelling examples, both orders, the same
scoring code (`critique.preference.score.compare_pairs`). The embedded SmolLM2 labels on the
transformers backend, each dtype in a fresh backend: fp32 (the reference), bf16 with the final
norm and LM head in fp32 (`fp32_head`, critique/backends/head_precision.py) and, when asked,
plain bf16, and vLLM's own prompt log-prob scoring (`vllm_fp32`, `vllm_bf16`: the peer a user
would pick instead; needs the `vllm` extra; on CPU the script binds vLLM to all cores unless
VLLM_CPU_OMP_THREADS_BIND is set). For each non-fp32 variant: the fraction of pairs whose winner (p_A > 0.5) is the fp32
winner, and the distribution of |p_bf16 - p_fp32| (median, 90th percentile, max); for all:
pairs/s, scored tokens/s (every row's tokens) and an effective MFU (2 x parameters x scored
tokens/s over the measured bf16 matmul peak; prefixes that rows share run once, so this counts
more work than was done). The rule for the CPU default (issue #15): bf16 only if winners agree on >= 98% and the
median |dp| <= 0.02. Last line: one JSON object with "bf16_winner_agreement" (the fp32-head
variant) and "bf16_default_allowed".
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
            "bf16": {"dtype": "bfloat16", "fp32_head": False},
            # the peer a user would pick instead: vLLM's own prompt log-probs (`vllm` extra)
            "vllm_fp32": {"backend": "vllm", "dtype": "float32"},
            "vllm_bf16": {"backend": "vllm", "dtype": "bfloat16"}}
# as examples/quickstart.yaml's label section labels
PER_PAIR = 1
FEW_SHOT = 1


def run_variant(model, options: dict, constitution, pairs, cfg, drawn) -> dict:
    from benchmarks.label_throughput import by_score
    from critique.backends import load_backend

    options = dict(options)
    backend = load_backend(options.pop("backend", "transformers"), model, progress=False,
                           **options)
    by_score(backend, constitution, pairs[:1], cfg, drawn[:1])  # warm-up
    run0 = backend.usage.scored_tokens
    t0 = time.perf_counter()
    labels = by_score(backend, constitution, pairs, cfg, drawn)
    dt = time.perf_counter() - t0
    ran = backend.usage.scored_tokens - run0
    inner = getattr(backend, "model", None)  # vLLM's engine holds its own copy
    params = sum(p.numel() for p in inner.parameters()) if inner is not None else None
    backend.close()
    return {"p_a": [r["p_a"] for r in labels], "seconds": dt, "pairs_per_s": len(pairs) / dt,
            "scored_tokens_per_s": ran / dt, "params": params}


def compare(model, constitution, pairs, cfg, drawn, variants=tuple(VARIANTS)) -> dict:
    """Label `pairs` (principles `drawn[i]` for pair i) in each of `variants` (fp32 first)."""
    from benchmarks.critique_throughput import vllm_cpu_env
    from benchmarks.dpo_vs_trl import matmul_peak_flops

    if any(v.startswith("vllm") for v in variants):
        import os

        vllm_cpu_env(os.cpu_count())  # all cores, as the transformers variants use
    if variants[0] != "fp32" or "bf16_fp32_head" not in variants:
        raise SystemExit(f"variants must start with fp32 and include bf16_fp32_head, got "
                         f"{','.join(variants)}")
    peak = matmul_peak_flops("bfloat16")
    res = {name: run_variant(model, VARIANTS[name], constitution, pairs, cfg, drawn)
           for name in variants}
    base = res["fp32"]["p_a"]
    out: dict = {"pairs": len(pairs), "bf16_peak_gflops": round(peak / 1e9, 1)}
    for name, r in res.items():
        out[f"{name}_pairs_per_s"] = round(r["pairs_per_s"], 4)
        out[f"{name}_scored_tokens_per_s"] = round(r["scored_tokens_per_s"], 1)
        # the fp32 model's count: fp32_head adds an untied copy of the head, not work per token
        out[f"{name}_mfu"] = round(2 * res["fp32"]["params"] * r["scored_tokens_per_s"] / peak,
                                   4)
        if name == "fp32":
            continue
        agree = sum((x > 0.5) == (y > 0.5) for x, y in zip(base, r["p_a"])) / len(base)
        dp = sorted(abs(x - y) for x, y in zip(base, r["p_a"]))
        out[f"{name}_winner_agreement"] = round(agree, 4)
        out[f"{name}_median_abs_dp"] = round(statistics.median(dp), 5)
        out[f"{name}_p90_abs_dp"] = round(dp[int(0.9 * (len(dp) - 1))], 5)
        out[f"{name}_max_abs_dp"] = round(dp[-1], 5)
        out[f"{name}_speedup_vs_fp32"] = round(res["fp32"]["seconds"] / r["seconds"], 3)
        out[f"{name}_p_a"] = [round(x, 7) for x in r["p_a"]]
    out["fp32_p_a"] = [round(x, 5) for x in base]  # for a histogram of where the pairs sit
    out["bf16_winner_agreement"] = out["bf16_fp32_head_winner_agreement"]
    out["bf16_default_allowed"] = (out["bf16_fp32_head_winner_agreement"] >= 0.98
                                   and out["bf16_fp32_head_median_abs_dp"] <= 0.02)
    return out


def agreement(args, n: int, variants) -> dict:
    """`compare` on the first `n` pairs, labelled with args.constitution (default: the
    quickstart's principle file) as the label stage labels them (module docstring)."""
    from benchmarks.label_throughput import HH_FILE, load_pairs
    from constitution import draw, load_constitution
    from critique.label.run import LabelConfig

    constitution = load_constitution(args.constitution or ROOT / "principles" / "harmless.yaml")
    pairs = load_pairs(args.data / HH_FILE, n, args.max_chars)
    cfg = LabelConfig(constitution="-", pairs="-", out="-", principles_per_pair=PER_PAIR,
                      few_shot=FEW_SHOT, batch_size=args.batch_size)
    pool = constitution.preference_principles
    drawn = [draw(pool, cfg.principles_per_pair, cfg.seed, i) for i in range(len(pairs))]
    out = compare(args.model, constitution, pairs, cfg, drawn, variants)
    return {"constitution": constitution.name, "principles_per_pair": PER_PAIR,
            "few_shot": FEW_SHOT, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data",
                    help="folder holding the HH-RLHF file")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=900)
    ap.add_argument("--model", default=None)
    ap.add_argument("--constitution", default=None,
                    help="principle file (default: principles/harmless.yaml)")
    ap.add_argument("--variants", default="fp32,bf16_fp32_head,bf16")
    a = ap.parse_args()
    print(json.dumps(agreement(a, a.pairs, a.variants.split(","))))


if __name__ == "__main__":
    main()
