"""The transformers backend: batched generation and scoring on CPU, CUDA or MPS.

    from critique.backends import load_backend, Sampling
    b = load_backend("transformers", None)          # None: the embedded SmolLM2
    b.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=32))

Prompts are the tokenizer's own chat template (`add_generation_prompt=True`) followed by the
optional assistant prefix text. Generation is a plain decode loop over a KV cache with LEFT
padding (so every row's next token sits in the last column). Each completion draws from its own
`torch.Generator`, seeded from (seed, prompt token ids, sample index): a seeded run reproduces,
and a row's text does not depend on which other rows share its batch or on the batch order.

Only safetensors weights are loaded, and no code from the model folder runs unless
`trust_remote_code=True`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from charter.core import procmem
from charter.core.errors import CharterError
from charter.core.models import model_label, require_safetensors, resolve_model
from critique.backends.base import Conversation, Sampling, Usage, generate_args
from critique.backends.decoding import cut_at_stop, pick_next, row_seed
from critique.backends.tokens import chat_prompt, encode, finish_score, option_rows, score_args

# Measured (benchmarks/README.md, "Backend dtype"): bf16 weights make generation 1.6x and
# score() 3.6x faster, but 12/16 greedy SmolLM2 answers diverge from fp32; on 200 HH-RLHF pairs
# labelled in bf16 with an fp32 head, 96.5% of winners match fp32 (issue #15's rule for a bf16
# default: >= 98%; "bf16 labelling agreement"). "auto" therefore keeps fp32 on CPU.
CPU_AUTO_DTYPE = "float32"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def autodetect_device() -> str:
    """cuda → mps → cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 batch_size: int = 32, score_batch_size: int | None = None,
                 trust_remote_code: bool = False, progress: bool = True,
                 max_length: int | None = None, share_prefix: bool = True,
                 kv_store_mb: float = 1024, fp32_head: bool | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise CharterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}",
                               field="dtype")
        for name, value in (("batch_size", batch_size), ("score_batch_size", score_batch_size)):
            if value is not None and value < 1:
                raise CharterError(f"{name} must be >= 1, got {value}", field=name)
        self.model_name = model_label(model)
        self.device = autodetect_device() if device == "auto" else device
        if dtype == "auto":
            dtype = {"cuda": "bfloat16", "cpu": CPU_AUTO_DTYPE}.get(self.device.split(":")[0],
                                                                    "float32")
        self.dtype = dtype
        if self.device == "cpu" and dtype in ("bfloat16", "float16"):
            from charter.core.hardware import cpu_bf16_native, slow_bf16_note

            if not cpu_bf16_native():
                print("warning: " + slow_bf16_note(f"dtype {dtype}", "use dtype auto (fp32 on "
                                                   "CPUs) or float32"), file=sys.stderr,
                      flush=True)
        self.batch_size = batch_size  # rows per generate forward (and per score forward,
        self.score_batch_size = score_batch_size  # unless this is set); both read per call
        self.progress = progress
        # Run shared token prefixes once: score() within a batch (prefix_cache.py); generate()
        # within a batch and across calls, from the last call's caches (kv_reuse.py), which
        # may hold up to kv_store_mb MiB
        self.share_prefix = share_prefix
        if kv_store_mb < 0:
            raise CharterError(f"kv_store_mb must be >= 0, got {kv_store_mb}", field="kv_store_mb")
        self.kv_store_mb = kv_store_mb
        self._store = None  # kv_reuse.KVStore of the last generate call
        # False: generate keeps no caches for a later call (`base.not_continued`)
        self.keep_caches = True
        self.usage = Usage()
        path = resolve_model(model)
        require_safetensors(path)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not progress:  # also quiet the "Loading weights" bar, then restore the setting
            hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), use_safetensors=True,
                trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CharterError(f"cannot load model {path!r}: {first}", field="model") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if not getattr(self.tokenizer, "chat_template", None):
            raise CharterError(f"model {path!r} has no chat template in its tokenizer",
                               field="model")
        try:
            self.model.to(self.device)
        except (RuntimeError, AssertionError) as e:
            raise CharterError(f"cannot use device {self.device!r}: {e}", field="device") from None
        self.model.eval()
        # bf16/fp16 body, fp32 final norm + head (None: on CPUs, where it costs no memory of
        # note); see head_precision.py
        if dtype != "float32" and (fp32_head or fp32_head is None
                                   and self.device.startswith("cpu")):
            from critique.backends.head_precision import fp32_head as to_fp32_head

            to_fp32_head(self.model)
        from critique.backends.kv_reuse import plain_cache_model

        # full attention everywhere: generate runs on preallocated cache layers and may reuse
        # caches across calls (kv_reuse.py); other models keep their own cache
        self._plain_cache = plain_cache_model(self.model.config)
        if self._plain_cache:  # one-token decode steps without SDPA's head repeat
            from critique.backends import decode_attention

            decode_attention.use(self.model)
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        # pad id only fills masked positions; any id will do when the tokenizer has none
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = set()
        for cfg in (self.model.generation_config, self.model.config):
            e = getattr(cfg, "eos_token_id", None)
            eos.update(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            eos.add(im_end)
        self.eos_ids = sorted(eos)
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings",
                                                None)

    # -----------------------------------------------------------------------------------------
    # prompts

    def prompt_text(self, conversation: Conversation, prefix: str = "") -> str:
        return chat_prompt(self.tokenizer, conversation, prefix)

    def _encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def _batches(self, order: list[int], size: int | None = None) -> list[list[int]]:
        size = size or self.batch_size
        return [order[i:i + size] for i in range(0, len(order), size)]

    def _bar(self, batches: list, desc: str):
        if self.progress and len(batches) > 1:
            from tqdm.auto import tqdm

            return tqdm(batches, desc=desc, unit="batch", leave=False)
        return batches

    def _check_len(self, n: int, i: int) -> None:
        if self.max_length and n >= self.max_length:
            raise CharterError(f"conversation {i} is {n} tokens; the model takes at most "
                               f"{self.max_length}", field="conversations")

    # -----------------------------------------------------------------------------------------
    # generate

    def generate(self, conversations: Sequence[Conversation], sampling: Sampling,
                 prefixes: Sequence[str] | None = None) -> list[list[str]]:
        """`sampling.n` completions per conversation; see the module docstring for seeding."""
        t0 = time.perf_counter()
        prefixes = generate_args(conversations, sampling, prefixes)
        prompts = [self._encode(self.prompt_text(c, p)) for c, p in zip(conversations, prefixes)]
        for i, ids in enumerate(prompts):
            self._check_len(len(ids), i)
        greedy = sampling.temperature == 0
        # Greedy samples are identical: decode once per conversation and copy.
        k = 1 if greedy else sampling.n
        rows = [(i, j) for i in range(len(prompts)) for j in range(k)]
        order = sorted(range(len(rows)), key=lambda r: len(prompts[rows[r][0]]))
        texts: list[str] = [""] * len(rows)
        from critique.backends.kv_reuse import KVStore

        old, self._store = self._store, None  # the old store is freed when this call ends
        if not self.keep_caches:  # nothing continues these conversations: keep no caches
            old = None
        new = (KVStore(int(self.kv_store_mb * 2**20))
               if self.share_prefix and self._plain_cache and self.keep_caches else None)
        for batch in self._bar(self._batches(order), "generate"):
            ids = [prompts[rows[r][0]] for r in batch]
            seeds = [row_seed(sampling.seed, prompts[rows[r][0]], rows[r][1]) for r in batch]
            for r, text in zip(batch, self._generate_batch(ids, seeds, sampling, old, new)):
                texts[r] = text
        self._store = new if self.share_prefix and self.keep_caches else None
        self.usage.generate_calls += 1
        self.usage.prompt_tokens += sum(len(p) for p in prompts) * k
        self.usage.generate_seconds += time.perf_counter() - t0
        out: list[list[str]] = [[] for _ in prompts]
        for (i, _), text in zip(rows, texts):
            out[i].append(text)
        procmem.trim()  # the batches' caches are freed: hand their pages back (see score)
        return [o * sampling.n if greedy else o for o in out]

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int],
                        sampling: Sampling, old=None, new=None) -> list[str]:
        import torch

        from critique.backends import kv_reuse

        dev = self.device
        B = len(prompts)
        if self.share_prefix and self._plain_cache:
            reused, segs = kv_reuse.reused(self.model, prompts, old, self.device)
            if reused is None:  # this model's cache cannot be reused: stop trying
                self.share_prefix = False
        if not (self.share_prefix and self._plain_cache):
            reused, segs = [0] * B, [[] for _ in range(B)]
        from_cache = sum(reused)
        if self.share_prefix and self._plain_cache:
            reused, segs = self._split_prefill(prompts, reused, segs)
        R = max(reused)  # columns of reused cache in front of the new tokens
        suffixes = [p[n:] for p, n in zip(prompts, reused)]
        T = max(len(p) for p in suffixes)
        cache = None
        past_mask = torch.zeros((B, 0), dtype=torch.long, device=dev)
        if R:  # room for the suffixes and the new tokens: no copy of the cache per step
            cache, past_mask = kv_reuse.build_past(segs, reused, dev,
                                                   reserve=T + sampling.max_new_tokens)
            if new is None:  # the batch's cache holds them now; only keep() reads them again
                segs = None
            self.usage.reused_prompt_tokens += from_cache
        elif self._plain_cache:
            cache = kv_reuse.new_cache(sampling.max_new_tokens)
        # left padding: the last column is every row's last token
        ids, mask, pos = kv_reuse.left_padded(suffixes, reused, past_mask, self.pad_id, dev)
        limit = [sampling.max_new_tokens] * B
        if self.max_length:
            limit = [min(sampling.max_new_tokens, self.max_length - len(p)) for p in prompts]
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        eos = torch.tensor(self.eos_ids, device=dev)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [lim <= 0 for lim in limit]
        stop = [s for s in sampling.stop if s]
        tail = max((len(s) for s in stop), default=0) + 2  # tokens that can hold a stop string
        step_ids = ids
        rows = list(range(B))  # the original row of each row still in the tensors
        with torch.inference_mode():
            while not all(done):
                # logits_to_keep=1: the prefill needs only the last position's (B, 1, V) logits
                res = self.model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = res.past_key_values
                if new is not None and step_ids is ids and not kv_reuse._shareable(cache):
                    self.share_prefix, new = False, None  # e.g. a sliding-window cache (the
                    # cache's type is set by the prefill: checked once)
                logits = res.logits[:, -1, :].float()  # (b, V), b = rows still decoding
                nxt = self._pick(logits, [gens[r] for r in rows], sampling)  # (b,)
                hit_eos = torch.isin(nxt, eos).tolist()
                nxt_list = nxt.tolist()
                for i, b in enumerate(rows):
                    if done[b]:  # no room for any token (max_length) from the start
                        continue
                    fed = out[b]  # the tokens the cache holds after the prompt
                    if hit_eos[i]:
                        done[b] = True
                    else:
                        out[b] = fed + [nxt_list[i]]  # picked, not fed yet
                        if len(out[b]) >= limit[b]:
                            done[b] = True
                        elif stop and cut_at_stop(self.tokenizer.decode(out[b][-tail:]),
                                                  stop)[1]:
                            done[b] = True
                    if done[b] and new is not None:
                        kv_reuse.keep(new, cache, i, R, mask[i], prompts[b] + fed, segs[b])
                keep = [i for i, b in enumerate(rows) if not done[b]]
                if not keep:
                    break
                if len(keep) < len(rows) and hasattr(cache, "batch_select_indices"):
                    # drop finished rows from the batch (a short "No." critique then costs
                    # less than a long revision); each row's own generator keeps its sequence
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    nxt, mask, pos = nxt[sel], mask[sel], pos[sel]
                    rows = [rows[i] for i in keep]
                n = len(rows)
                step_ids = nxt.view(n, 1)
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
                pos = pos[:, -1:] + 1
        self.usage.generated_tokens += sum(len(o) for o in out)
        return [cut_at_stop(self.tokenizer.decode(o, skip_special_tokens=True), stop)[0]
                for o in out]

    def _split_prefill(self, prompts: list[list[int]], reused: list[int], segs: list
                       ) -> tuple[list[int], list]:
        """Where one left-padded prefill would run short prompts at a much longer one's length,
        prefill groups of similar length apart (`kv_reuse.prefill_groups`), each on top of its
        rows' cached prefixes, up to each row's last prompt token; the batch then starts from
        those caches and runs one token per row. Returns the rows' cached lengths and segments
        (unchanged when one group is cheapest). Measured on the quickstart's eval (16 prompts of
        ~100-200 tokens and one of 401, SmolLM2, 2 cores): see benchmarks/README.md."""
        from critique.backends import kv_reuse

        upto = [len(p) - 1 for p in prompts]  # the last prompt token runs with the batch
        groups = kv_reuse.prefill_groups([u - n for u, n in zip(upto, reused)])
        if len(groups) < 2:
            return reused, segs
        lengths, grown = list(reused), [list(s) for s in segs]
        for rows in groups:
            if not kv_reuse.extend(self.model, prompts, upto, rows, lengths, grown,
                                   self.pad_id, self.device):
                self.share_prefix = False  # this model's cache cannot be reused
                return reused, segs
        self.usage.split_prefills += len(groups)
        return lengths, grown

    _pick = staticmethod(pick_next)  # a method, so tests can watch what each step draws

    # -----------------------------------------------------------------------------------------
    # score

    def score(self, conversations: Sequence[Conversation], options: Sequence[Sequence[str]],
              prefixes: Sequence[str] | None = None) -> list[list[float]]:
        """Summed log-prob of each option's tokens after the templated conversation + prefix.

        Which tokens are the option's: the rule of `critique.backends.tokens`.
        """
        t0 = time.perf_counter()
        prefixes = score_args(conversations, options, prefixes)
        # Options that are one token after a shared context (the labeller's "A"/"B" after "(",
        # the ratings "1".."9") are read from ONE row: the context's next-token distribution.
        # Other options get a row of their own (prompt+option, first scored position).
        rows: list[tuple[list[int], int]] = []
        context_row: dict[tuple[int, ...], int] = {}
        reads: list[tuple[int, int | None]] = []  # per option: (row, next token id or None)
        for i, (conv, opts, prefix) in enumerate(zip(conversations, options, prefixes)):
            for opt in opts:
                full, start = self.option_tokens(conv, opt, prefix)
                self._check_len(len(full), i)
                if start == len(full) - 1:  # exactly one scored token
                    ctx = tuple(full[:-1])
                    if ctx not in context_row:
                        context_row[ctx] = len(rows)
                        rows.append((full[:-1], len(full) - 1))  # scores no token itself
                    reads.append((context_row[ctx], full[-1]))
                else:
                    rows.append((full, start))
                    reads.append((len(rows) - 1, None))
        want: dict[int, set[int]] = {}  # context row -> next-token ids to read
        for r, tok in reads:
            if tok is not None:
                want.setdefault(r, set()).add(tok)
        totals = [0.0] * len(rows)
        next_logp: dict[tuple[int, int], float] = {}  # (row, token id) -> log-prob
        # Sharing prefixes: sorted by ids, rows with a common prefix share a batch and sit
        # side by side (prefix_cache.plan groups neighbours); else by length, to pad least.
        order = sorted(range(len(rows)), key=(lambda r: rows[r][0]) if self.share_prefix
                       else (lambda r: len(rows[r][0])))
        for batch in self._bar(self._batches(order, self.score_batch_size), "score"):
            sums, last = self._score_rows([rows[r] for r in batch])  # last: (B, V)
            for k, r in enumerate(batch):
                totals[r] = sums[k]
                for tok in want.get(r, ()):
                    next_logp[(r, tok)] = float(last[k, tok])
        scores = [next_logp[(r, tok)] if tok is not None else totals[r] for r, tok in reads]
        # glibc keeps what a call's forwards freed, and the next call (or the other model's, in
        # a stage with two) builds its peak on the fragments: give them back once per call
        procmem.trim()
        return finish_score(self.usage, rows, scores, options, time.perf_counter() - t0)

    def option_tokens(self, conversation: Conversation, option: str, prefix: str = ""
                      ) -> tuple[list[int], int]:
        """Ids of templated conversation + prefix + option, and the index of the first id that
        `score` counts as the option's (after the longest common prefix with the prompt's ids)."""
        return option_rows(self._encode, self.prompt_text(conversation, prefix), [option])[0]

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> tuple[list[float], Any]:
        """`_score_batch`, with shared prefixes run once where that saves work."""
        if self.share_prefix:
            from critique.backends import prefix_cache

            p = prefix_cache.plan(rows)
            # a stage-2 row with neither global prefix nor extension would attend to nothing
            if p.saved() >= prefix_cache.MIN_SHARED and (p.g or all(p.ext)):
                res = prefix_cache.score_shared(self.model, rows, p, self.pad_id, self.device)
                if res is not None:
                    self.usage.shared_score_tokens += p.saved()
                    return res
                self.share_prefix = False  # this model's cache cannot be expanded
        return self._score_batch(rows)

    def _score_batch(self, rows: list[tuple[list[int], int]]) -> tuple[list[float], Any]:
        """Left-padded rows, so every row's option tokens sit in the last columns: the LM head
        and log-softmax run only over the last K+1 positions (K = the most option tokens in the
        batch) instead of the whole (B, T, V) sequence. Returns each row's summed log-prob of
        its scored tokens and the (B, V) log-probs of the token after each row."""
        import torch

        B, T = len(rows), max(len(f) for f, _ in rows)
        K = max(len(f) - start for f, start in rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        scored = torch.zeros((B, K), dtype=torch.bool)  # which of the last K targets count
        for b, (full, start) in enumerate(rows):
            ids[b, T - len(full):] = torch.tensor(full)
            mask[b, T - len(full):] = 1
            if len(full) > start:
                scored[b, K - (len(full) - start):] = True
        ids, mask, scored = ids.to(self.device), mask.to(self.device), scored.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions that skip the padding
        with torch.inference_mode():
            # use_cache=False: a model's default cache would keep every layer's keys and
            # values (B x T positions x layers; 0.57 GB at 16 x 800 tokens here) until the end
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                logits_to_keep=K + 1, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)  # (B, K+1, V): [:, :K] predict ids[:, T-K:]
            tok_logp = logp[:, :K].gather(-1, ids[:, T - K:, None]).squeeze(-1)  # (B, K)
            total = torch.where(scored, tok_logp, 0.0).sum(-1)  # (B,)
        return total.tolist(), logp[:, K].cpu()  # (B,), (B, V): the next token's log-probs

    def close(self) -> None:
        self.model = None
        self._store = None  # the last call's KV caches
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

