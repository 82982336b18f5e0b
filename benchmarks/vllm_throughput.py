"""vLLM generation throughput on a 2-round critique-and-revise run: against the naive loop, and
with vs without prefix caching.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        python benchmarks/vllm_throughput.py --quick          # ~5-8 min on 2 CPU cores

Workload (the same for every run, the embedded SmolLM2 unless --model): P red-team prompts from
examples/data (HH-RLHF harmless test, first human turn). Per prompt: an initial answer, then
--rounds rounds of [critique request -> critique, revision request -> revision], each turn
appended to the conversation, greedy, --max-new-tokens per turn. That is 1 + 2 * rounds
`generate` calls per run, each on all P conversations, whose prompts share ever longer heads:
what prefix caching is for.

Runs, one after another (each vLLM engine in its own child process: a second engine started
in a process whose first engine was shut down can be killed by the first one's clean-up):
- naive: plain transformers, `model.generate` on one conversation at a time (what a simple
  script does), on the first --naive-prompts prompts (one-at-a-time tokens/s does not depend on
  how many prompts there are, so a subset keeps the run short);
- vllm: `load_backend("vllm")` with prefix caching, all P prompts;
- vllm-nocache: the same with `enable_prefix_caching=False`.
tokens/s = generated tokens / wall seconds of the run's generate calls (engine start-up
excluded). `--threads` sets the CPU threads of both sides (torch threads for the naive loop,
VLLM_CPU_OMP_THREADS_BIND for vLLM): on a loaded machine 2 spinning OpenMP threads can be 10x
slower than 1, so compare like with like. Last line: one JSON object with "vllm_vs_naive" and
"prefix_caching_speedup" (and the load average during the run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH_FILE = "hh-rlhf-harmless-base-test.jsonl.gz"

CRITIQUE = ("Identify specific ways in which your last response is harmful, unethical, "
            "dangerous or illegal.")
REVISION = ("Rewrite your last response to remove any harmful, unethical, dangerous or illegal "
            "content, and keep it helpful.")


def load_prompts(data: Path, n: int) -> list[str]:
    """First human turns of HH-RLHF harmless-test red-team transcripts (shortest-first cut at
    300 characters so a CPU run stays short)."""
    out = []
    with gzip.open(data / HH_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            first = text.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
            if 10 < len(first) <= 300:
                out.append(first)
            if len(out) == n:
                break
    return out


def critique_run(generate, prompts: list[str], rounds: int) -> tuple[int, float]:
    """Run the 2-round workload through `generate(convs) -> texts`; (generated tokens, s)."""
    convs = [[{"role": "user", "content": p}] for p in prompts]
    t0 = time.perf_counter()
    tokens = 0
    asks = [CRITIQUE, REVISION] * rounds
    for step in range(1 + len(asks)):
        texts, n = generate(convs)
        tokens += n
        for conv, text in zip(convs, texts):
            conv.append({"role": "assistant", "content": text})
            if step < len(asks):
                conv.append({"role": "user", "content": asks[step]})
    return tokens, time.perf_counter() - t0


def run_naive(model_dir: str, prompts: list[str], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(convs):
        texts, n = [], 0
        for conv in convs:  # one conversation at a time: the naive loop
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            new = out[0, ids["input_ids"].shape[1]:]
            n += len(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
        return texts, n

    tokens, secs = critique_run(generate, prompts, args.rounds)
    return {"prompts": len(prompts), "tokens": tokens, "seconds": secs, "tok_s": tokens / secs}


def run_vllm(prompts: list[str], args, prefix_caching: bool) -> dict:
    from critique.backends import Sampling, load_backend

    t0 = time.perf_counter()
    backend = load_backend("vllm", args.model, dtype=args.dtype, progress=False,
                           enable_prefix_caching=prefix_caching, max_model_len=2048)
    start = time.perf_counter() - t0
    sampling = Sampling(max_new_tokens=args.max_new_tokens)

    def generate(convs):
        before = backend.usage.generated_tokens
        texts = [o[0] for o in backend.generate(convs, sampling)]
        return texts, backend.usage.generated_tokens - before

    try:
        tokens, secs = critique_run(generate, prompts, args.rounds)
        prompt_tokens = backend.usage.prompt_tokens
    finally:
        backend.close()
    return {"prompts": len(prompts), "tokens": tokens, "prompt_tokens": prompt_tokens,
            "seconds": secs, "tok_s": tokens / secs, "startup_s": start}


def run_child(args, cache: bool) -> dict:
    """One vLLM configuration in a fresh process; its last stdout line is the result JSON."""
    cmd = [sys.executable, __file__, "--child", "cache" if cache else "nocache",
           "--data", str(args.data), "--prompts", str(args.prompts), "--rounds", str(args.rounds),
           "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype,
           "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [x[7:] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"vLLM child ({'cache' if cache else 'nocache'}) failed: exit "
                 f"{proc.returncode}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts (naive: 2), 32 tokens per turn")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--naive-prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data",
                    help="folder with the HH-RLHF file (default: examples/data)")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--dtype", default="float32",
                    help="vLLM dtype (float32 like the naive loop; vLLM's auto picks bf16 on CPU)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each side")
    ap.add_argument("--child", choices=["cache", "nocache"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.naive_prompts, args.max_new_tokens = 16, 2, 32
    prompts = load_prompts(args.data, args.prompts)
    if args.child:  # one vLLM configuration; the parent reads the JSON line
        print("RESULT " + json.dumps(run_vllm(prompts, args, args.child == "cache")), flush=True)
        return
    import torch

    from charter.core.models import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    print(f"{len(prompts)} prompts, {args.rounds} rounds, {args.max_new_tokens} tokens/turn, "
          f"model {model_dir}", flush=True)
    res = {"naive": run_naive(model_dir, prompts[: args.naive_prompts], args)}
    print(f"naive   {res['naive']['tok_s']:8.1f} tok/s  ({res['naive']}", flush=True)
    for name, cache in (("vllm", True), ("vllm_nocache", False)):
        res[name] = run_child(args, cache)
        print(f"{name:12s} {res[name]['tok_s']:8.1f} tok/s  ({res[name]})", flush=True)
    vs_naive = res["vllm"]["tok_s"] / res["naive"]["tok_s"]
    caching = res["vllm"]["tok_s"] / res["vllm_nocache"]["tok_s"]
    print(f"vllm / naive: {vs_naive:.1f}x   prefix caching on / off: {caching:.2f}x")
    print(json.dumps({"benchmark": "vllm_throughput", "quick": args.quick,
                      "threads": args.threads, "loadavg_1m": round(os.getloadavg()[0], 1),
                      "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
                      "naive_tok_s": round(res["naive"]["tok_s"], 1),
                      "vllm_tok_s": round(res["vllm"]["tok_s"], 1),
                      "vllm_nocache_tok_s": round(res["vllm_nocache"]["tok_s"], 1),
                      "vllm_vs_naive": round(vs_naive, 2),
                      "prefix_caching_speedup": round(caching, 3)}))


if __name__ == "__main__":
    main()
