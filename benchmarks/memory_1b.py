"""Training memory of a 1B model, measured against the computed table in docs/scaling.md.

    python benchmarks/memory_1b.py                    # Llama-3.2-1B's shape: bf16, bf16 + in-backward
    python benchmarks/memory_1b.py --shape tiny --modes fp32,bf16,bf16-inbw   # a smoke run
    python benchmarks/memory_1b.py --shape vocab-1b --modes fp32-bf16m,fp32-bf16m-inbw  # no bf16 CPU

The model is random-init (no weights needed): Llama-3.2-1B's shape (1.24 B parameters, tied
embeddings) with the embedded SmolLM2 tokenizer, saved in bf16 to a temporary folder. Each mode
then runs `train_dpo` in its own subprocess (so the peak is its own): `--steps` steps of one pair
per step whose prompt and two responses fill `--max-length`, shared prompt, chunked log-probs,
reference log-probs computed before training. Modes: `fp32` (fp32 weights, fused AdamW), `bf16`
(bf16 weights, BF16AdamW), `bf16-inbw` (`bf16` with `optimizer_in_backward`: no clipping),
`fp32-bf16m` (fp32 weights, bf16 AdamW moments), `fp32-bf16m-inbw` (that, in backward).

Reported per mode: the subprocess's peak resident size (VmHWM) and what docs/scaling.md computes
for it: the runtime (the same subprocess's resident size after its imports, measured) + bytes per
parameter x parameters (16 fp32, 10 bf16, 8 bf16 + in-backward, the table's) + activations (34 x
hidden x layers bytes per token through the model, bf16, no checkpointing: the table's rule).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # LlamaConfig fields
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=4096),
    # Llama-3.2-1B's vocabulary and width with 2 layers: the vocabulary-sized tensors of the 1B
    # shape at a size fp32 runs in on a CPU without bf16 instructions (383 M parameters)
    "vocab-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                 tie_word_embeddings=True, max_position_embeddings=1024),
}
MODES = {  # name -> DPOConfig fields
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16-inbw": {"precision": "bf16", "optimizer_in_backward": True, "max_grad_norm": 0.0},
    "fp32-bf16m": {"precision": "fp32", "bf16_moments": True},
    "fp32-bf16m-inbw": {"precision": "fp32", "bf16_moments": True, "optimizer_in_backward": True,
                        "max_grad_norm": 0.0},
}


def state_bytes(fields: dict) -> int:
    """Bytes per parameter kept for the run (docs/scaling.md's table): training.optim's count,
    less the gradient's bytes when no gradient is kept for the whole model."""
    from training.optim import bytes_per_param

    grad = 4 if fields["precision"] == "fp32" else 2
    return bytes_per_param(fields["precision"], fields.get("bf16_moments", False)) - (
        grad if fields.get("optimizer_in_backward") else 0)


ACT_BYTES = 34  # per token, per hidden unit, per layer (bf16, no checkpointing; docs/scaling.md)


def build_model(shape: str, folder: Path) -> int:
    """A random-init model of `shape` in bf16 with the embedded tokenizer; returns parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from charter.core.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never a 4-byte copy of the whole model
    model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class PhasePeaks:
    """Peak resident size per phase of `train_dpo`, sampled every 5 ms by a thread (torch
    releases the GIL in its kernels), so a peak can be put down to loading, the reference
    log-probs, the training steps or the final save."""

    def __init__(self) -> None:
        import threading

        from charter.core import procmem

        self.phase, self.peaks, self._stop = "start", {}, threading.Event()
        self._rss = procmem.rss_mb
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.note()

    def note(self) -> None:
        mb = self._rss() or 0
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), mb)

    def wrap(self, module, name: str, phase: str) -> None:
        """Run `module.name` under `phase` (restoring the phase it was called in)."""
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            before, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.note()
                self.phase = before

        setattr(module, name, wrapped)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run_mode(a) -> dict:
    """In the subprocess: train and measure."""
    import training.dpo as dpo
    from charter.core import procmem
    from training.dpo import train_dpo
    from training.options import DPOConfig

    runtime = procmem.rss_mb()  # torch, transformers and our modules imported; no model yet
    phases = PhasePeaks()
    for name, phase in (("open_run", "load"), ("reference_logps", "reference log-probs"),
                        ("resume", "optimizer setup"), ("run_steps", "steps"),
                        ("update", "optimizer step"),
                        ("finish", "final save")):
        phases.wrap(dpo, name, phase)
    fields = MODES[a.mode]
    out = Path(a.work) / f"run-{a.mode}"
    cfg = DPOConfig(data=a.pairs, out=str(out), model=a.model, batch_size=1, max_length=a.max_length,
                    lr=1e-5, max_steps=a.steps, save_every=None, warmup_ratio=0.0,
                    ref_batch_size=1, **fields)
    t0 = time.perf_counter()
    train_dpo(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = phases.stop()
    # the kernel updates VmHWM lazily (per-thread counters), so a sample can be a few MB above it
    return {"runtime_mb": runtime, "peak_mb": max(procmem.peak_mb() or 0, *peaks.values()),
            "phase_peaks_mb": peaks,
            "seconds": round(time.perf_counter() - t0, 1),
            "step_seconds": [round(r["elapsed_s"], 1) for r in rows],
            "loss": [r["loss"] for r in rows]}


def tokens_per_step(model_dir: str, pairs: Path, max_length: int) -> int:
    """Tokens through the model in one training step (shared prompt: the prompt once)."""
    from transformers import AutoTokenizer

    from training.data import load_pair_rows, tokenise_pairs

    tok = AutoTokenizer.from_pretrained(model_dir)
    ex = tokenise_pairs(tok, load_pair_rows(pairs), max_length, progress=False)
    return max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in ex)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--modes", default="bf16,bf16-inbw",
                    help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # in the subprocess
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print("RESULT " + json.dumps(run_mode(a)), flush=True)
        return
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: {bad or modes} not of {', '.join(MODES)}")
    from dpo_vs_trl import make_pairs

    shape = SHAPES[a.shape]
    with tempfile.TemporaryDirectory(prefix="charter-mem1b-") as work:
        model_dir = Path(work) / "model"
        params = build_model(a.shape, model_dir)
        pairs = Path(work) / "pairs.jsonl"
        n = max(a.steps, 1)
        pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n, a.max_length)))
        tokens = tokens_per_step(str(model_dir), pairs, a.max_length)
        act_mb = ACT_BYTES * shape["hidden_size"] * shape["num_hidden_layers"] * tokens / 2**20
        print(f"{a.shape}: {params / 1e9:.3f} B parameters, {tokens} tokens per step "
              f"(activations computed: {act_mb:,.0f} MB)", flush=True)
        results = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--mode", mode, "--work", work, "--model",
                   str(model_dir), "--pairs", str(pairs), "--steps", str(a.steps),
                   "--max-length", str(a.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(line[-1][len("RESULT "):])
            state_mb = state_bytes(MODES[mode]) * params / 2**20
            r["computed_mb"] = round(r["runtime_mb"] + state_mb + act_mb)
            r["measured_vs_computed"] = round(r["peak_mb"] / r["computed_mb"], 3)
            results[mode] = r
            print(f"{mode:>10}: peak {r['peak_mb']:,} MB, computed {r['computed_mb']:,} MB "
                  f"(runtime {r['runtime_mb']:,} + state {state_mb:,.0f} + activations "
                  f"{act_mb:,.0f}): {r['measured_vs_computed']:.2f}x; steps "
                  f"{r['step_seconds']} s", flush=True)
            print("            peak by phase: " + ", ".join(
                f"{k} {v:,}" for k, v in r["phase_peaks_mb"].items()) + " MB", flush=True)
    print(json.dumps({"shape": a.shape, "parameters": params, "tokens_per_step": tokens,
                      "modes": results}))


if __name__ == "__main__":
    main()
