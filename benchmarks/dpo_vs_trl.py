"""Our DPO loop against TRL's DPOTrainer: same model, data, batch, length and steps.

    python benchmarks/dpo_vs_trl.py                  # 20 steps x 8 pairs x 512 tokens, bf16
                                                     # (fp32 on a CPU without bf16 instructions)
    python benchmarks/dpo_vs_trl.py --quick          # 4 steps x 2 pairs x 128 tokens
    python benchmarks/dpo_vs_trl.py --steps 3 --quality-steps 0 --precision bf16-mixed
    python benchmarks/dpo_vs_trl.py --quality-only --precision bf16-mixed --quality-also bf16
    python benchmarks/dpo_vs_trl.py --quality-only --precision fp32 --quality-also fp32+bf16-moments

Both sides train the embedded SmolLM2-135M-Instruct for the same steps on the same pairs (one
epoch, so each side sees every pair once), each in its own subprocess so that peak RSS is its own.
TRL gets its best CPU configuration: reference log-probs precomputed before training and bf16
autocast (`precompute_ref_log_probs=True`, `bf16=True`); ours runs `--precision` (default bf16:
bf16 weights, BF16AdamW, chunked log-probs; on a CPU without bf16 instructions both sides run
fp32, since there bf16 is emulated: charter/core/hardware.py). Timing covers the training steps only (not model
loading or the reference pass).

Same math: in fp32, with a reference that differs from the policy (SmolLM2 with its final norm
scaled by 0.9, so the loss is not trivially log 2), the per-batch DPO loss of both
implementations is compared on the same batches of pairs: largest relative difference.

Quality guard (`--quality-steps`, default 50): the same small DPO run in fp32 and in
`--precision`; largest per-step loss difference and the mean reward accuracy of each. A mode
in `--quality-also` may add `+bf16-moments` (fp32 or bf16-mixed weights, bf16 AdamW moments).

MFU: 6 · parameters · tokens/s over the machine's bf16 matmul peak measured here (2048²
matmuls; fp32 peak printed too), or its fp32 peak where that is higher (a CPU without bf16
instructions, where `--precision` defaults to fp32 and TRL runs fp32 too). Needs the `bench` extra (trl). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16-mixed", "bf16")  # CPU training modes (fp16 autocast needs a GPU)
MODES = PRECISIONS + ("fp32+bf16-moments", "bf16-mixed+bf16-moments")  # the quality guard's
sys.path.insert(0, str(ROOT))

WORDS = ("the a river mountain quietly build explain history garden engine careful light "
         "answer question people city water system simple reason language music travel "
         "morning safety recipe number window ocean library planet").split()


def make_pairs(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Deterministic synthetic pairs with varied lengths that fit in `max_length` tokens
    (so neither side truncates, and both process exactly the same tokens)."""
    rng = random.Random(seed)
    w = max(4, (max_length - 40) // 2)  # words ≈ tokens here; the template takes ~35 tokens

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [{"prompt": [{"role": "user", "content": text(w // 4, w // 2)}],
             "chosen": [{"role": "assistant", "content": text(w // 4, w // 2)}],
             "rejected": [{"role": "assistant", "content": text(w // 4, w // 2)}]}
            for _ in range(n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def count_tokens(model_dir: str, pairs_file: Path, max_length: int) -> int:
    """Tokens through the model per epoch: prompt+chosen plus prompt+rejected, per pair."""
    from transformers import AutoTokenizer

    from training.data import load_pair_rows, tokenise_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    ex = tokenise_pairs(tok, load_pair_rows(pairs_file), None, progress=False)
    longest = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in ex)
    if longest > max_length:
        sys.exit(f"a pair has {longest} tokens > --max-length {max_length}: would truncate")
    return sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in ex)


def run_ours(a) -> dict:
    from training.dpo import train_dpo
    from training.options import DPOConfig

    extra = json.loads(a.ours_options or "{}")
    tag = "".join(f"-{k}" for k, v in sorted(extra.items()) if v)  # one folder per mode
    out = Path(a.work) / f"ours-{a.precision}-{a.lr}{tag}"
    cfg = DPOConfig(data=str(a.pairs), out=str(out), model=a.model, batch_size=a.batch_size,
                    max_length=a.max_length, lr=a.lr, beta=0.1, precision=a.precision,
                    save_every=None, warmup_ratio=0.0, ref_batch_size=a.batch_size, **extra)
    train_dpo(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # elapsed_s: wall time of the steps since the previous log row (training steps only)
    return {"seconds": sum(r["elapsed_s"] for r in rows), "steps": len(rows),
            "peak_rss_mb": peak_rss_mb(), "loss": [r["loss"] for r in rows],
            "accuracy": [r["rewards/accuracies"] for r in rows]}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from charter.core.records import read_jsonl

    rows = [obj for _, obj in read_jsonl(a.pairs)]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    args = DPOConfig(output_dir=str(Path(a.work) / "trl"),
                     per_device_train_batch_size=a.batch_size,
                     max_length=a.max_length, learning_rate=a.lr, beta=0.1, num_train_epochs=1,
                     bf16=a.precision != "fp32", use_cpu=True, precompute_ref_log_probs=True,
                     precompute_ref_batch_size=a.batch_size, report_to=[], save_strategy="no",
                     logging_steps=10**6, warmup_steps=0, lr_scheduler_type="cosine",
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)

    class Clock(TrainerCallback):
        seconds, t0 = 0.0, 0.0

        def on_step_begin(self, *_, **__):
            Clock.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            Clock.seconds += time.perf_counter() - Clock.t0

    trainer.add_callback(Clock())
    trainer.train()
    return {"seconds": Clock.seconds, "steps": trainer.state.global_step,
            "peak_rss_mb": peak_rss_mb()}


def loss_parity(a, n_batches: int) -> float:
    """Largest relative difference of the fp32 per-batch DPO loss, ours vs TRL's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from charter.core.records import read_jsonl, read_pairs
    from training.collate import collate_pairs
    from training.data import encode_pair
    from training.loop import forward_logps
    from training.losses import preference_loss

    tok = AutoTokenizer.from_pretrained(a.model)
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    with torch.no_grad():
        ref.model.norm.weight.mul_(0.9)  # a reference unlike the policy
    rows = [obj for _, obj in read_jsonl(a.pairs)]
    pairs = read_pairs(a.pairs)
    args = DPOConfig(output_dir=str(Path(a.work) / "parity"),
                     per_device_train_batch_size=a.batch_size, max_length=None, beta=0.1,
                     use_cpu=True, report_to=[])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.model.eval()
    worst = 0.0
    for b in range(n_batches):
        idx = list(range(b * a.batch_size, (b + 1) * a.batch_size))
        feats = [trainer.train_dataset[i] for i in idx]
        with torch.no_grad():
            theirs = trainer.compute_loss(trainer.model, trainer.data_collator(feats)).item()
            ex = [encode_pair(tok, pairs[i], (str(a.pairs), i + 1), None) for i in idx]
            batch = collate_pairs(ex, tok.pad_token_id)
            pol, _, _ = forward_logps(policy, batch)
            rl, _, _ = forward_logps(ref, batch)
            n = len(idx)
            ours = preference_loss("sigmoid", pol[:n], pol[n:], rl[:n], rl[n:],
                                   beta=0.1).losses.mean().item()
        print(f"parity batch {b}: ours {ours:.7f} trl {theirs:.7f}", file=sys.stderr)
        worst = max(worst, abs(ours - theirs) / abs(theirs))
    return worst


def matmul_peak_flops(dtype: str = "bfloat16", seconds: float = 2.0, n: int = 2048) -> float:
    import torch

    x = torch.randn(n, n, dtype=getattr(torch, dtype))
    y = torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(2):
        x @ y
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x @ y
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0)


def run_side(a, side: str, pairs: Path, batch_size: int, max_length: int, precision: str,
             lr: float, options: str = "") -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", a.work, "--pairs", str(pairs),
           "--model", a.model, "--batch-size", str(batch_size), "--max-length", str(max_length),
           "--precision", precision, "--lr", str(lr), "--ours-options", options or "{}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def precision_list(value: str) -> list[str]:
    """`--quality-also`'s comma-separated modes (a precision, optionally `+bf16-moments`)."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown precision {', '.join(bad)}; expected some of "
                                         f"{', '.join(MODES)}")
    return modes


def mode_side(mode: str) -> tuple[str, str]:
    """A quality mode's precision and our side's extra options (JSON)."""
    precision, _, extra = mode.partition("+")
    return precision, json.dumps({"bf16_moments": True} if extra == "bf16-moments" else {})


def quality_guard(a) -> dict:
    """`--quality-steps` DPO steps on the embedded model (2 pairs x 128 tokens a step, lr 5e-6)
    in fp32 and in `--precision` (and each of `--quality-also`): the largest per-step loss
    difference and both runs' mean reward accuracy (tolerance stated in benchmarks/README.md:
    0.02 and equal accuracy). The top-level keys are `--precision`'s; `quality_by_precision`
    holds every mode's, fp32 included, with its training seconds."""
    pairs = Path(a.work) / "quality.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in
                             make_pairs(2 * a.quality_steps, 128, seed=1)))
    modes = dict.fromkeys(["fp32", a.precision, *a.quality_also])  # in order, once each
    runs = {}
    for mode in modes:
        precision, options = mode_side(mode)
        runs[mode] = run_side(a, "ours", pairs, 2, 128, precision, 5e-6, options)
    base = runs["fp32"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    by = {p: {"max_loss_diff": max(abs(x - y) for x, y in zip(base["loss"], r["loss"])),
              "accuracy": mean(r["accuracy"]), "final_loss": r["loss"][-1],
              "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
          for p, r in runs.items()}
    test = by[a.precision]
    return {"quality_max_loss_diff": test["max_loss_diff"],
            "quality_accuracy_fp32": by["fp32"]["accuracy"], "quality_accuracy": test["accuracy"],
            "quality_final_loss_fp32": by["fp32"]["final_loss"],
            "quality_final_loss": test["final_loss"], "quality_by_precision": by}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 steps of 2 pairs, 128 tokens")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="ours; TRL runs bf16 autocast unless fp32 (default: bf16 where the CPU "
                        "has bf16 instructions, else fp32: bf16 is emulated there, ~100x slower)")
    p.add_argument("--ours-options", default="",
                   help='extra DPOConfig fields for our side, JSON, e.g. {"chunked_logps": false}')
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--parity-batches", type=int, default=2)
    p.add_argument("--quality-steps", type=int, default=50, help="0 = skip the quality guard")
    p.add_argument("--quality-only", action="store_true", help="run only the quality guard")
    p.add_argument("--quality-also", default="", type=precision_list,
                   help="more precision modes for the quality guard, e.g. bf16-mixed,bf16")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:  # a child process: run one side, print its JSON
        res = run_ours(a) if a.side == "ours" else run_trl(a)
        print("RESULT " + json.dumps(res))
        return
    if a.quick:
        a.steps, a.batch_size, a.max_length = 4, 2, 128
    if a.precision is None:
        from charter.core.hardware import cpu_bf16_native

        a.precision = "bf16" if cpu_bf16_native() else "fp32"
        print(f"precision {a.precision} (this CPU "
              f"{'has' if a.precision == 'bf16' else 'has no'} bf16 instructions)",
              file=sys.stderr)
    from charter.core.models import resolve_model

    a.model = resolve_model(None)
    work = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    a.work, a.pairs = str(work), work / "pairs.jsonl"
    if a.quality_only:
        print(json.dumps({**quality_guard(a), "load_avg_1m": os.getloadavg()[0]}))
        return
    a.pairs.write_text("".join(json.dumps(r) + "\n"
                               for r in make_pairs(a.steps * a.batch_size, a.max_length)))
    tokens = count_tokens(a.model, a.pairs, a.max_length)
    res = {}
    for side in ("ours", "trl"):
        res[side] = run_side(a, side, a.pairs, a.batch_size, a.max_length, a.precision, a.lr,
                             a.ours_options)
        res[side]["tokens_per_s"] = tokens / res[side]["seconds"]
        print(f"{side}: { {k: v for k, v in res[side].items() if k not in ('loss', 'accuracy')} }",
              file=sys.stderr)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(a.model)).parameters())
    peak, peak32 = matmul_peak_flops("bfloat16"), matmul_peak_flops("float32")
    diff = loss_parity(a, a.parity_batches)
    out = {"tokens_per_s_ratio": res["ours"]["tokens_per_s"] / res["trl"]["tokens_per_s"],
           "peak_rss_ratio": res["ours"]["peak_rss_mb"] / res["trl"]["peak_rss_mb"],
           "loss_max_rel_diff": diff,
           # against the machine's fastest matmul: bf16's, unless this CPU emulates bf16
           "mfu": 6 * n_params * res["ours"]["tokens_per_s"] / max(peak, peak32),
           "ours_tokens_per_s": res["ours"]["tokens_per_s"],
           "trl_tokens_per_s": res["trl"]["tokens_per_s"],
           "ours_peak_rss_mb": res["ours"]["peak_rss_mb"],
           "trl_peak_rss_mb": res["trl"]["peak_rss_mb"],
           "bf16_peak_gflops": peak / 1e9, "fp32_peak_gflops": peak32 / 1e9,
           "load_avg_1m": os.getloadavg()[0]}
    if a.quality_steps:
        out.update(quality_guard(a))
    print(f"ours {res['ours']['tokens_per_s']:.0f} tok/s, {res['ours']['peak_rss_mb']:.0f} MB; "
          f"trl {res['trl']['tokens_per_s']:.0f} tok/s, {res['trl']['peak_rss_mb']:.0f} MB; "
          f"matmul peak bf16 {peak / 1e9:.0f} / fp32 {peak32 / 1e9:.0f} GFLOP/s; "
          f"{n_params / 1e6:.1f}M params; {a.steps} steps x {a.batch_size} pairs, max_length "
          f"{a.max_length}, {a.precision}, torch threads {torch.get_num_threads()}, load "
          f"{os.getloadavg()}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
