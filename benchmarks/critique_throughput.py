"""Generated tokens/s of the critique-and-revise loop against the naive loop, in one run.

    python benchmarks/critique_throughput.py --quick                 # a few minutes on CPU
    python benchmarks/critique_throughput.py --backends transformers,vllm --prompts 64

Both sides run the same loop code (`critique.revise.run.run_critique`) on the same red-team prompts
(the first human turns of examples/data/hh-rlhf-harmless-base-test.jsonl.gz), the same model
(default: the embedded SmolLM2-135M-Instruct), constitution, rounds and greedy settings:

- naive: one prompt at a time through all its steps (batch size 1), each step one plain
  `model.generate` call per conversation (transformers, same device and dtype as the backend),
  on the first `--naive-prompts` of the prompts (default: all; a rate does not need all of
  them, and on a CPU the naive side dominates the run time);
- each backend named in --backends, built by `critique.backends.load_backend(name, model)`,
  with `--batch-size` prompts per generate call.

Throughput is generated tokens (as counted by each side: new tokens before the end-of-turn
token) over wall time of the whole loop, so a side that happens to generate more tokens is not
favoured. Prints a table, then one JSON object on the last line: `{name}_vs_naive` per backend
(the target is >= 6 for transformers at batch 32, >= 20 for vllm) plus the tokens/s behind
each ratio.

With `vllm` in --backends, two more runs show what prefix caching saves: the same loop with
`--caching-rounds` (default 2) rounds, once with vLLM's prefix caching and once without, each
engine in a child process of its own (a second engine in one process can be killed by the first
one's clean-up); they add `vllm_cache_tokens_per_s`, `vllm_nocache_tokens_per_s` and
`prefix_caching_speedup`. vLLM runs in the naive side's dtype (fp32 on CPU; vLLM's own "auto"
would pick bf16) and, with --threads, on that many cores (VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RED_TEAM = "hh-rlhf-harmless-base-test.jsonl.gz"
DATA_DIRS = [ROOT / "examples" / "data"]  # shipped with the repository (its README: licences)

# A small constitution of our own, used when principles/harmless.yaml is not there.
CONSTITUTION = """\
name: bench
description: Two harmlessness principles for the throughput benchmark.
principles:
  - id: harm
    critique: "Identify specific ways in which your last response is harmful, unethical or
      dangerous. If there is nothing to fix, say so."
    revision: "Please rewrite your last response to remove anything harmful, unethical or
      dangerous, and keep what is helpful."
  - id: honest
    critique: "Point out anything in your last response that could mislead or hurt the person
      or others. If there is nothing to fix, say so."
    revision: "Please rewrite your last response so that it is honest and safe."
"""


class NaiveBackend:
    """The baseline: `model.generate` on one conversation at a time, no batching, no padding."""

    name = "naive"

    def __init__(self, model: str | None, device: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from charter.core.models import model_label, resolve_model
        from critique.backends.base import Usage

        path = resolve_model(model)
        self.model_name = model_label(model)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.device = device
        self.usage = Usage()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.eos.add(self.tok.convert_tokens_to_ids("<|im_end|>"))

    def generate(self, conversations, sampling, prefixes=None):
        import torch

        out = []
        t0 = time.perf_counter()
        for conv in conversations:
            text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            enc = self.tok(text, add_special_tokens=False, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(**enc, max_new_tokens=sampling.max_new_tokens,
                                          do_sample=False, eos_token_id=sorted(self.eos),
                                          pad_token_id=self.tok.pad_token_id)
            new = ids[0, enc["input_ids"].shape[1]:].tolist()
            while new and new[-1] in self.eos:  # count tokens before the end-of-turn token
                new.pop()
            self.usage.generated_tokens += len(new)
            self.usage.prompt_tokens += enc["input_ids"].shape[1]
            out.append([self.tok.decode(new, skip_special_tokens=True)])
        self.usage.generate_calls += 1
        self.usage.generate_seconds += time.perf_counter() - t0
        return out

    def close(self):
        pass


def write_prompts(data: Path, path: Path, n: int) -> None:
    """The first `n` distinct first human turns of the red-team test set."""
    from charter.core.records import read_prompts

    seen, rows = set(), []
    for item in read_prompts(data):
        text = item.messages[0]["content"]
        if text not in seen:
            seen.add(text)
            rows.append({"prompt": text})
        if len(rows) == n:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def measure(backend, args, constitution: str, prompts: str, batch_size: int) -> dict:
    from critique.revise.run import CritiqueConfig, run_critique

    with tempfile.TemporaryDirectory() as out:
        cfg = CritiqueConfig(constitution=constitution, prompts=prompts, out=out,
                             model=args.model, rounds=args.rounds, batch_size=batch_size,
                             max_new_tokens=args.max_new_tokens, few_shot=0, progress=False)
        t0 = time.perf_counter()
        m = run_critique(cfg, backend=backend)
        seconds = time.perf_counter() - t0
    tokens = m["generated_tokens"]
    return {"tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 2), "flagged": m["counts"]["flagged"],
            "calls": sum(s["calls"] for s in m["timings"]["steps"].values())}


def vllm_child(args, mode: str) -> dict:
    """The loop on vLLM with prefix caching `mode` ("on"/"off") in a child process."""
    import subprocess

    cmd = [sys.executable, __file__, "--vllm-child", mode, "--prompts", str(args.prompts),
           "--rounds", str(args.caching_rounds), "--batch-size", str(args.batch_size),
           "--max-new-tokens", str(args.max_new_tokens)]
    for flag, value in (("--model", args.model), ("--constitution", args.constitution),
                        ("--threads", args.threads), ("--data", args.data)):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [x[7:] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"vLLM prefix-caching {mode} run failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def vllm_cpu_env(threads: int | None = None) -> None:
    """vLLM on CPU uses one core unless told otherwise: bind it to `threads` cores (only where
    given: vLLM's own default otherwise), reserve none, and give its KV cache 2 GB."""
    if threads:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="32 prompts (naive: 8), 1 round, 32 new tokens (minutes on a CPU)")
    ap.add_argument("--backends", default="transformers",
                    help="comma-separated backends to measure against the naive loop")
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2)")
    ap.add_argument("--prompts", type=int, default=64, help="red-team prompts")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--naive-prompts", type=int, default=None,
                    help="prompts for the naive side (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--constitution", default=None,
                    help="principle file (default: principles/harmless.yaml, else a built-in)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both sides (default: torch's); on a shared, "
                    "oversubscribed machine 1 avoids threads spinning against each other")
    ap.add_argument("--backend-options", type=json.loads, default={},
                    help='JSON: keyword options per backend, e.g. \'{"vllm": '
                    '{"gpu_memory_utilization": 0.2, "max_model_len": 4096}}\'')
    ap.add_argument("--data", default=None, help=f"the red-team file (default: {RED_TEAM} in "
                    "examples/data)")
    ap.add_argument("--caching-rounds", type=int, default=2,
                    help="rounds of the vLLM prefix caching on/off runs (0: skip them)")
    ap.add_argument("--vllm-child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.rounds, args.max_new_tokens = 32, 1, 32
        args.naive_prompts = args.naive_prompts or 8
    data = Path(args.data) if args.data else next(
        (d / RED_TEAM for d in DATA_DIRS if (d / RED_TEAM).exists()), None)
    if data is None or not data.exists():
        sys.exit(f"missing {args.data or RED_TEAM}: give --data (the shipped copy is "
                 "examples/data)")

    import torch

    from charter.core.errors import CharterError
    from critique.backends import Sampling, load_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    vllm_cpu_env(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"  # what the transformers backend picks
    tmp = Path(tempfile.mkdtemp(prefix="critique-bench-"))
    prompts = tmp / "prompts.jsonl"
    write_prompts(data, prompts, args.prompts)
    naive_prompts = tmp / "naive-prompts.jsonl"
    write_prompts(data, naive_prompts, min(args.naive_prompts or args.prompts, args.prompts))
    constitution = args.constitution
    if constitution is None:
        shipped = ROOT / "principles" / "harmless.yaml"
        constitution = str(shipped) if shipped.exists() else str(tmp / "bench.yaml")
        if not shipped.exists():
            (tmp / "bench.yaml").write_text(CONSTITUTION, encoding="utf-8")

    if args.vllm_child:  # one prefix-caching run in this fresh process, for the parent
        backend = load_backend("vllm", args.model, dtype=dtype, progress=False,
                               enable_prefix_caching=args.vllm_child == "on")
        try:
            backend.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=4))
            r = measure(backend, args, constitution, str(prompts), args.batch_size)
        finally:
            backend.close()
        print("RESULT " + json.dumps(r), flush=True)
        return 0

    print(f"device {device} ({dtype}), torch threads {torch.get_num_threads()}, "
          f"{args.prompts} prompts x {args.rounds} round(s), max_new_tokens "
          f"{args.max_new_tokens}, batch {args.batch_size} (naive: "
          f"{args.naive_prompts or args.prompts} prompts, batch 1), constitution {constitution}")
    naive = NaiveBackend(args.model, device, dtype)
    naive.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=4))  # warm-up
    base = measure(naive, args, constitution, str(naive_prompts), batch_size=1)
    print(f"{'naive':>14}: {base['tokens']:6d} tokens in {base['seconds']:8.1f} s = "
          f"{base['tokens_per_s']:8.1f} tokens/s ({base['calls']} generate calls)")
    del naive
    result: dict = {"naive_tokens_per_s": base["tokens_per_s"]}
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in names:
        opts = {"dtype": dtype} if name in ("transformers", "vllm") else {}
        opts.update(args.backend_options.get(name, {}))
        try:  # one backend that cannot start (no vLLM, no memory) does not void the others
            backend = load_backend(name, args.model, **opts)
        except CharterError as e:
            print(f"{name:>14}: not measured: {e}")
            result[f"{name}_error"] = str(e)[:300]
            continue
        try:
            backend.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=4))
            r = measure(backend, args, constitution, str(prompts), args.batch_size)
        finally:
            backend.close()
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{name:>14}: {r['tokens']:6d} tokens in {r['seconds']:8.1f} s = "
              f"{r['tokens_per_s']:8.1f} tokens/s ({r['calls']} generate calls)  "
              f"{ratio:.2f}x naive")
        result[f"{name}_tokens_per_s"] = r["tokens_per_s"]
        result[f"{name}_vs_naive"] = round(ratio, 2)
    if "vllm" in names and args.caching_rounds > 0:
        runs = {mode: vllm_child(args, mode) for mode in ("on", "off")}
        speedup = runs["on"]["tokens_per_s"] / runs["off"]["tokens_per_s"]
        for mode, label in (("on", "cache"), ("off", "nocache")):
            r = runs[mode]
            print(f"{'vllm ' + label:>14}: {r['tokens']:6d} tokens in {r['seconds']:8.1f} s = "
                  f"{r['tokens_per_s']:8.1f} tokens/s ({args.caching_rounds} rounds)")
            result[f"vllm_{label}_tokens_per_s"] = r["tokens_per_s"]
        print(f"prefix caching on / off: {speedup:.2f}x")
        result["prefix_caching_speedup"] = round(speedup, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
