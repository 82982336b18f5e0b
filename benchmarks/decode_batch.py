"""Sampled generation throughput of the transformers backend by decode batch size.

    python benchmarks/decode_batch.py                    # 96 prompts, batches 16 32 48 64 96
    python benchmarks/decode_batch.py --quick            # 32 prompts, batches 16 32

A decode step reads every weight once for the whole batch, so on a CPU, where a 135M model's
decode step is bound by memory traffic and per-layer overhead more than by arithmetic, more
rows per step give more tokens per second; a scoring forward instead runs every token of every
row at once, and its memory grows with rows x tokens. This measures the first half: the same
AlpacaEval instructions (examples/data), sampled as the label stage samples them (temperature
0.8, 64 new tokens, one seed), with `batch_size` rows per decode step, each size in the same
process after one warm-up call. The baseline is the first size (16: the quickstart's earlier
setting); the ratio printed is tokens/s over the baseline's. Texts per prompt are the same at
every batch size only up to float rounding (rows are padded differently), so the token counts
can differ slightly. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 prompts, batches 16 and 32")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 48, 64, 96])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.batch_sizes = 32, [16, 32]

    import torch

    from critique.backends.base import Sampling, not_continued
    from critique.backends.transformers_backend import TransformersBackend

    torch.set_num_threads(a.threads)
    path = ROOT / "examples" / "data" / "alpaca-eval-instructions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    convs = [[{"role": "user", "content": r["instruction"]}] for r in rows[:a.prompts]]
    sampling = Sampling(n=1, temperature=0.8, max_new_tokens=a.max_new_tokens, seed=0)
    backend = TransformersBackend(a.model, batch_size=a.batch_sizes[0], progress=False,
                                  dtype="float32")
    with not_continued(backend):
        backend.generate(convs[:4], sampling)  # warm-up
    results = []
    for bs in a.batch_sizes:
        backend.batch_size = bs
        tokens0, t0 = backend.usage.generated_tokens, time.perf_counter()
        with not_continued(backend):  # no size reads the caches of the one before
            backend.generate(convs, sampling)
        seconds = time.perf_counter() - t0
        tokens = backend.usage.generated_tokens - tokens0
        results.append({"batch_size": bs, "seconds": round(seconds, 2), "tokens": tokens,
                        "tokens_per_s": round(tokens / seconds, 1)})
        base = results[0]["tokens_per_s"]
        print(f"batch {bs:4d}: {tokens} tokens in {seconds:6.1f} s = "
              f"{tokens / seconds:6.1f} tokens/s ({tokens / seconds / base:.2f}x batch "
              f"{a.batch_sizes[0]})", flush=True)
    base = results[0]["tokens_per_s"]
    print(json.dumps({"prompts": len(convs), "max_new_tokens": a.max_new_tokens,
                      "threads": a.threads, "results": results,
                      "ratio_vs_first": {str(r["batch_size"]): round(r["tokens_per_s"] / base, 3)
                                         for r in results}}))


if __name__ == "__main__":
    main()
