"""fp32 vs bf16 for the transformers backend on the embedded SmolLM2: speed and fidelity.

    python benchmarks/backend_dtype.py            # 16 greedy prompts, 20 scored conversations
    python benchmarks/backend_dtype.py --quick    # 8 prompts, 10 conversations, shorter outputs

Measures, for the same prompts in both dtypes: generation tokens/s (greedy, one batch), the max
and mean absolute difference of `score()` log-probs, the share of greedy texts that are
identical, and score() rows/s. The baseline is fp32; the ratio printed is bf16 over fp32.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "What is the capital of France?", "How do I bake bread at home?",
    "Explain photosynthesis to a ten-year-old.", "Write a short poem about the sea.",
    "How can I pick a lock without a key?", "Give me three tips for a job interview.",
    "What's the best way to insult my coworker?", "How do I kill a Python process?",
    "Summarise the plot of Romeo and Juliet.", "How do I make a fake ID?",
    "What are the health benefits of walking?", "Tell me how to hack my neighbour's wifi.",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?",
    "How do I get revenge on my ex?", "List some fun things to do on a rainy day.",
]
OPTIONS = ["A", "B", " A", "(A) It is safer.", "Sure, here is how", "I can't help with that."]


def run(dtype: str, convs, score_convs, max_new: int) -> dict:
    import torch

    from critique.backends.base import Sampling
    from critique.backends.transformers_backend import TransformersBackend

    torch.manual_seed(0)
    b = TransformersBackend(None, dtype=dtype, device="cpu", batch_size=len(convs),
                            progress=False)
    b.generate(convs[:2], Sampling(max_new_tokens=4))  # warm-up (oneDNN kernels)
    b.usage.generated_tokens = 0
    t0 = time.perf_counter()
    texts = b.generate(convs, Sampling(max_new_tokens=max_new))
    gen_s = time.perf_counter() - t0
    toks = b.usage.generated_tokens
    t0 = time.perf_counter()
    scores = b.score(score_convs, [OPTIONS] * len(score_convs),
                     prefixes=["The answer is ("] * len(score_convs))
    score_s = time.perf_counter() - t0
    b.close()
    return {"texts": [t[0] for t in texts], "scores": [s for row in scores for s in row],
            "tok_per_s": toks / gen_s, "gen_tokens": toks,
            "score_rows_per_s": len(score_convs) * len(OPTIONS) / score_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_gen, n_score, max_new = (8, 10, 32) if args.quick else (16, 20, 64)
    import torch

    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:n_gen]]
    score_convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": "Okay."},
                    {"role": "user", "content": "Which is better, (A) or (B)?"}]
                   for p in (PROMPTS * 2)[:n_score]]
    base = run("float32", convs, score_convs, max_new)
    bf16 = run("bfloat16", convs, score_convs, max_new)
    diffs = [abs(a - b) for a, b in zip(base["scores"], bf16["scores"])]
    same = sum(a == b for a, b in zip(base["texts"], bf16["texts"]))
    result = {
        "benchmark": "backend_dtype", "quick": args.quick, "threads": torch.get_num_threads(),
        "prompts": n_gen, "max_new_tokens": max_new, "scored_conversations": n_score,
        "fp32_tok_per_s": round(base["tok_per_s"], 1), "bf16_tok_per_s": round(bf16["tok_per_s"], 1),
        "ratio_gen_bf16_over_fp32": round(bf16["tok_per_s"] / base["tok_per_s"], 2),
        "fp32_score_rows_per_s": round(base["score_rows_per_s"], 1),
        "bf16_score_rows_per_s": round(bf16["score_rows_per_s"], 1),
        "ratio_score_bf16_over_fp32": round(bf16["score_rows_per_s"] / base["score_rows_per_s"], 2),
        "score_max_abs_diff": round(max(diffs), 4),
        "score_mean_abs_diff": round(sum(diffs) / len(diffs), 4),
        "greedy_identical": f"{same}/{n_gen}",
    }
    for a, b in zip(base["texts"], bf16["texts"]):
        if a != b:
            print(f"fp32: {a[:70]!r}\nbf16: {b[:70]!r}\n")
    print(f"bf16/fp32 generation speed: {result['ratio_gen_bf16_over_fp32']}x, "
          f"score speed: {result['ratio_score_bf16_over_fp32']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
