"""Labelling throughput: option log-probs (both orders) vs generating an answer and parsing it.

    python benchmarks/label_throughput.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/label_throughput.py --pairs 50       # + accuracy on 50 HH-RLHF pairs

Same model (the embedded SmolLM2 unless --model), same backend instance, same pairs, same
labelling conversations (critique/preference/prompt.py), both orders for both methods, one run:
- score:    `critique.preference.score.compare_pairs`: one `backend.score` call per chunk with both orders
            of every pair, options "A"/"B" read after the assistant prefix "(";
- generate: greedy `backend.generate` of up to --gen-tokens tokens per order, the first A/B
            letter parsed from the text (unparsed answers count as 0.5).
Pairs come from examples/data (HH-RLHF harmless test): the conversation before the final
assistant turn is the prompt, the chosen and rejected final turns are the two responses (chosen
shown as A in even pairs, as B in odd ones, so a position-only labeller scores 50%).
With the transformers backend the scoring is timed again without shared-prefix scoring
(`share_prefix=False`: every row's full prompt) for "shared_vs_unshared".
Prints pairs/s of each, accuracy against `chosen` (given order only, both orders, generate) and
position bias; the last line is one JSON object with "score_vs_generate" and
"bf16_winner_agreement".

bf16 agreement (`--agreement N`, default 200, 32 with --quick, 0: off; off by default on a CPU
without bf16 instructions, where bf16 is emulated, ~100x slower): the first N HH-RLHF pairs
labelled as the label stage labels them (benchmarks/label_dtype.py): the quickstart's principle
file (principles/harmless.yaml, or --constitution), one preference principle drawn per pair,
its first labelling example as few-shot, both orders; each in a fresh transformers backend, fp32
(the reference) and bf16 with the final norm and LM head in fp32. It reports the fraction of
pairs with the fp32 winner and the distribution of |p_bf16 - p_fp32|.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"

# One preference principle in this project's own words (override with --constitution).
CONSTITUTION = """\
name: bench-harmless
description: One harmlessness question for the labelling benchmark.
principles:
  - id: harmless
    preference: >-
      Which of these assistant responses is less harmful? Choose the response that a wise,
      ethical and caring person would be more likely to give.
"""

CHOICE_RE = re.compile(r"(?<![A-Za-z])\(?([AB])\)?(?![A-Za-z])")


def parse_choice(text: str) -> str | None:
    """The first standalone "A" or "B" (optionally in parentheses) in a generated answer."""
    m = CHOICE_RE.search(text)
    return m.group(1) if m else None


def load_pairs(path: Path, n: int, max_chars: int) -> list[dict]:
    """HH-RLHF records whose chosen/rejected transcripts differ only in the final assistant
    turn, shorter than max_chars (keeps a CPU run short)."""
    from charter.core.records import parse_hh_transcript

    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if len(rec["chosen"]) > max_chars or len(rec["rejected"]) > max_chars:
                continue
            c, r = parse_hh_transcript(rec["chosen"]), parse_hh_transcript(rec["rejected"])
            if (len(c) < 2 or c[:-1] != r[:-1] or c[-1]["role"] != "assistant"
                    or r[-1]["role"] != "assistant" or c[-1]["content"] == r[-1]["content"]
                    or not c[-1]["content"] or not r[-1]["content"]):
                continue
            k = len(out)
            a, b = (c[-1]["content"], r[-1]["content"]) if k % 2 == 0 else \
                (r[-1]["content"], c[-1]["content"])
            out.append({"messages": c[:-1], "a": a, "b": b, "preferred": "a" if k % 2 == 0
                        else "b"})
            if len(out) == n:
                break
    return out


def by_score(backend, constitution, pairs, cfg, drawn: list | None = None) -> list[dict]:
    """Both-order labels of `pairs`; `drawn[i]`: the principles of pair i (default: the
    constitution's first preference principle for every pair)."""
    from critique.preference.score import compare_pairs

    first = constitution.preference_principles[:1]
    out = []
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i:i + cfg.batch_size]
        prs = drawn[i:i + cfg.batch_size] if drawn is not None else [first] * len(chunk)
        out += compare_pairs(backend, constitution,
                             [(p["messages"], p["a"], p["b"], pr) for p, pr in zip(chunk, prs)],
                             cfg)
    return out


def by_generate(backend, constitution, pairs, cfg, gen_tokens: int) -> tuple[list[dict], int]:
    from critique.backends.base import Sampling
    from critique.preference import prompt as lp

    pr = constitution.preference_principles[0]
    greedy = Sampling(temperature=0.0, max_new_tokens=gen_tokens)
    out, unparsed = [], 0
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i:i + cfg.batch_size]
        convs = [lp.comparison(constitution, pr, p["messages"], x, y, cfg.few_shot)
                 for p in chunk for x, y in ((p["a"], p["b"]), (p["b"], p["a"]))]
        texts = [t[0] for t in backend.generate(convs, greedy)]
        firsts = []
        for t in texts:
            c = parse_choice(t)
            unparsed += c is None
            firsts.append(0.5 if c is None else float(c == "A"))
        for k in range(len(chunk)):
            given, swapped_first = firsts[2 * k], firsts[2 * k + 1]
            orders = [given, 1.0 - swapped_first]
            out.append({"p_a": sum(orders) / 2, "orders": orders})
    return out, unparsed


def stats(labels: list[dict], pairs: list[dict]) -> dict:
    from critique.preference.labelmath import accuracy, position_bias

    prefs = [p["preferred"] for p in pairs]
    return {"accuracy_given_order": accuracy([r["orders"][0] for r in labels], prefs),
            "accuracy_both_orders": accuracy([r["p_a"] for r in labels], prefs),
            "position_bias": position_bias([r["orders"] for r in labels])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 pairs")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--model", default=None, help="labeller (default: embedded SmolLM2)")
    ap.add_argument("--backend", default="transformers")
    ap.add_argument("--constitution", default=None, help="principle file (default: built-in)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per chunk")
    ap.add_argument("--gen-tokens", type=int, default=32,
                    help="tokens the generating labeller may write (its answer and a reason)")
    ap.add_argument("--few-shot", type=int, default=0)
    ap.add_argument("--skip-generate", action="store_true",
                    help="only the log-prob labeller (for accuracy runs); no ratio")
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data",
                    help="folder with the HH-RLHF file (default: examples/data)")
    ap.add_argument("--no-share-prefix", action="store_true",
                    help="transformers backend: run every row's full prompt (the baseline of "
                         "shared-prefix scoring)")
    ap.add_argument("--max-chars", type=int, default=900, help="skip longer transcripts")
    ap.add_argument("--agreement", type=int, default=None, metavar="N",
                    help="label N other pairs in fp32 and in bf16 (fp32 head) as the label "
                         "stage does (benchmarks/label_dtype.py): winner agreement and |dp| "
                         "(default 200, 32 with --quick; 0: skip)")
    ap.add_argument("--agreement-variants", default="fp32,bf16_fp32_head",
                    help="dtypes the agreement run labels with (fp32 first; also: bf16, "
                         "vllm_fp32, vllm_bf16: vLLM's prompt log-probs)")
    args = ap.parse_args()
    n = 16 if args.quick else args.pairs
    n_agree = args.agreement if args.agreement is not None else (32 if args.quick else 200)
    if args.agreement is None:
        import torch

        from charter.core.hardware import cpu_bf16_native

        if not torch.cuda.is_available() and not cpu_bf16_native():  # bf16 emulated: 32 pairs would take hours; ask for it
            print("bf16 agreement skipped: this CPU has no bf16 instructions (bf16 is emulated "
                  "here, ~100x slower than fp32); --agreement N runs it anyway", file=sys.stderr)
            n_agree = 0

    from constitution import load_constitution, parse_constitution
    from critique.backends import load_backend
    from critique.label.run import LabelConfig

    constitution = (load_constitution(args.constitution) if args.constitution
                    else parse_constitution(CONSTITUTION, "<benchmark>"))
    pairs = load_pairs(args.data / HH_FILE, n, args.max_chars)
    cfg = LabelConfig(constitution="-", pairs="-", out="-", principles_per_pair=1,
                      few_shot=args.few_shot, batch_size=args.batch_size)
    options = {"share_prefix": False} if args.no_share_prefix else {}
    backend = load_backend(args.backend, args.model, **options)
    # warm-up (first-call allocations) on one pair, both methods
    by_score(backend, constitution, pairs[:1], cfg)
    if not args.skip_generate:
        by_generate(backend, constitution, pairs[:1], cfg, 2)

    t0 = time.perf_counter()
    scored = by_score(backend, constitution, pairs, cfg)
    t_score = time.perf_counter() - t0
    s = stats(scored, pairs)
    print(f"pairs: {len(pairs)}  model: {backend.model_name}  backend: {backend.name}")
    print(f"score    (both orders): {len(pairs) / t_score:8.3f} pairs/s  ({t_score:.1f} s)  "
          f"acc given {s['accuracy_given_order']:.3f}  both {s['accuracy_both_orders']:.3f}  "
          f"position bias {s['position_bias']:.3f}")
    unshared = None
    if getattr(backend, "share_prefix", False):  # the same scoring, every row's full prompt
        backend.share_prefix = False
        t0 = time.perf_counter()
        by_score(backend, constitution, pairs, cfg)
        unshared = time.perf_counter() - t0
        backend.share_prefix = True
        print(f"score, no prefix sharing: {len(pairs) / unshared:8.3f} pairs/s  "
              f"({unshared:.1f} s)  shared prefixes are {unshared / t_score:.2f}x faster")
    sharing = {"shared_vs_unshared": round(unshared / t_score, 3) if unshared else None,
               "bf16_winner_agreement": None}
    if n_agree:
        from benchmarks.label_dtype import agreement

        dtypes = agreement(args, n_agree, args.agreement_variants.split(","))
        print(f"bf16 agreement: {json.dumps(dtypes)}")
        sharing.update(bf16_winner_agreement=dtypes["bf16_winner_agreement"],
                       bf16_median_abs_dp=dtypes.get("bf16_fp32_head_median_abs_dp"),
                       bf16_default_allowed=dtypes["bf16_default_allowed"])
    if args.skip_generate:
        print(json.dumps({"score_vs_generate": None, **sharing, "pairs": len(pairs),
                          "score_pairs_per_s": round(len(pairs) / t_score, 4),
                          "score": {k: round(v, 4) for k, v in s.items()}}))
        return
    t0, gen0 = time.perf_counter(), backend.usage.generated_tokens
    generated, unparsed = by_generate(backend, constitution, pairs, cfg, args.gen_tokens)
    t_gen = time.perf_counter() - t0
    answer_tokens = (backend.usage.generated_tokens - gen0) / (2 * len(pairs))
    g = stats(generated, pairs)
    print(f"generate (both orders): {len(pairs) / t_gen:8.3f} pairs/s  ({t_gen:.1f} s)  "
          f"acc both {g['accuracy_both_orders']:.3f}  position bias {g['position_bias']:.3f}  "
          f"unparsed {unparsed}/{2 * len(pairs)}  tokens/answer {answer_tokens:.1f}")
    ratio = t_gen / t_score
    print(json.dumps({
        "score_vs_generate": round(ratio, 3), **sharing, "pairs": len(pairs),
        "score_pairs_per_s": round(len(pairs) / t_score, 4),
        "generate_pairs_per_s": round(len(pairs) / t_gen, 4), "gen_tokens": args.gen_tokens,
        "tokens_per_answer": round(answer_tokens, 2),
        "score": {k: round(v, 4) for k, v in s.items()},
        "generate": {k: round(v, 4) for k, v in g.items()}, "unparsed": unparsed}))


if __name__ == "__main__":
    main()
