"""Label log-probs without [tokens x vocab] logits: the LM head and log-softmax run only over
the positions that predict a label token, a chunk of rows at a time, forward and backward.

The full path (`training.logps`) asks the model for logits from the first label position on:
(rows x positions x vocab) values, their fp32 copy and, in backward, a gradient of the same
size; with SmolLM2's 49k vocab and 8 pairs of 512 tokens that is several GB. Here the model
runs up to its head, the
positions with a label are gathered (padding and prompt rows drop out), and `HeadLogps`
computes `logit[target] - logsumexp(logits)` per position in chunks of `CHUNK` rows, keeping only
one log-sum-exp per position for backward, where each chunk's logits are recomputed. Peak
memory is CHUNK x vocab instead of tokens x vocab; the extra cost is one more head matmul in
backward.

The hidden states are the head's own input, captured by standing in for the head's forward
for the call (so whatever the model does before its head, hooks included, is kept). Used where
the logits are exactly the head's output: checked once per model on one position, with the
full path where they differ (a final soft-cap, a logit scale, a head with a bias).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

CHUNK = 1024  # positions per head chunk: 1024 x 49k vocab x 4 bytes = 200 MB of fp32 logits
VOCAB_SLICE = 8192  # most weight rows per slice in backward (a matmul's temporaries scale with
                    # its operands: 1 GB for a whole 128k x 2048 bf16 matrix on an AVX2 CPU)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class HeadLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[target] per row, in chunks of rows; fp32 result."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        dt = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dt), weight.to(dt)
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            lse = torch.empty_like(out)
            for s in range(0, h.shape[0], chunk):
                logits = (h[s:s + chunk] @ w.T).float()
                lse[s:s + chunk] = torch.logsumexp(logits, -1)
                picked = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
                out[s:s + chunk] = picked - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.dt = chunk, dt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(ctx.dt), weight.to(ctx.dt)
            if need_w:
                gh, gw = _backward_by_vocab(h, w, targets, lse, grad_out.float(), ctx.chunk,
                                            need_h, weight.dtype)
                return (gh.to(hidden.dtype) if need_h else None), gw, None, None
            if not need_h:
                return None, None, None, None
            gh = torch.empty_like(hidden)  # a frozen head (LoRA): positions in chunks
            for s in range(0, h.shape[0], ctx.chunk):
                go = grad_out[s:s + ctx.chunk].float()
                # d/dlogits of (logit[t] - lse) = onehot(t) - softmax
                g = torch.exp((h[s:s + ctx.chunk] @ w.T).float() - lse[s:s + ctx.chunk, None])
                g.mul_(-go[:, None])
                g.scatter_add_(1, targets[s:s + ctx.chunk, None], go[:, None])
                gh[s:s + ctx.chunk] = (g.to(ctx.dt) @ w).to(hidden.dtype)
        return gh, None, None, None


def _backward_by_vocab(h, w, targets, lse, go, chunk: int, need_h: bool, w_dtype):
    """HeadLogps' gradients with the weight's, a slice of the vocabulary at a time: each row of
    the weight's gradient is one matmul over all positions (d/dlogits of logit[t] - lse is
    onehot(t) - softmax), written once in the weight's dtype. Chunking by positions instead
    needs an fp32 accumulator of the weight's whole shape plus each chunk's product of that shape
    (and for bf16 its fp32 copy and the final cast: 2.6 GB at once for Llama-3.2-1B's tied
    128k x 2048 matrix, for a 0.5 GB gradient).
    A slice's logits are (positions x slice), at most `chunk` x vocab values as in forward, and
    at most VOCAB_SLICE rows of the weight; the hidden-state gradient adds up over slices in fp32
    (positions x hidden)."""
    n, vocab = h.shape[0], w.shape[0]
    step = max(1, min(VOCAB_SLICE, chunk * vocab // max(n, 1)))
    gw = torch.empty(w.shape, dtype=w_dtype, device=w.device)
    gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    rows = torch.arange(n, device=h.device)
    for v in range(0, vocab, step):
        ws = w[v:v + step]
        g = torch.exp((h @ ws.T).float() - lse[:, None])
        g.mul_(-go[:, None])
        inside = (targets >= v) & (targets < v + ws.shape[0])
        g.index_put_((rows[inside], targets[inside] - v), go[inside], accumulate=True)
        g = g.to(h.dtype)
        gw[v:v + step] = g.T @ h
        if need_h:
            gh.add_((g @ ws).float())
    return gh, gw


def head_of(model) -> torch.nn.Module | None:
    """The output projection if it is a plain bias-free Linear, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return head


@contextlib.contextmanager
def head_inputs(head: torch.nn.Module):
    """Within: the head returns (..., 0) empty logits and its inputs (the final hidden states,
    exactly as the model feeds its head) are appended to the yielded list."""
    box: list[torch.Tensor] = []
    had = "forward" in head.__dict__
    orig = head.__dict__.get("forward")

    def capture(x):
        box.append(x)
        return x.new_zeros(*x.shape[:-1], 0)

    head.forward = capture
    try:
        yield box
    finally:
        if had:
            head.forward = orig
        else:
            del head.forward


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits_are_head(model, head, ids: torch.Tensor) -> bool:
    """Whether the model's logits are exactly head(input of head), checked once per model on
    one row of `ids` (a soft-cap or scale after the head fails it)."""
    if model not in _CHECKED:
        with torch.no_grad():
            want = model(input_ids=ids[:1], logits_to_keep=1, use_cache=False).logits[:, -1]
            with head_inputs(head) as box:
                model(input_ids=ids[:1], logits_to_keep=1, use_cache=False)
            got = (box[0][:, -1] @ head.weight.to(box[0].dtype).T).float()
        _CHECKED[model] = bool(torch.allclose(got, want.float(), rtol=1e-3, atol=1e-4))
    return _CHECKED[model]


def label_logps(model, targets: torch.Tensor, mask: torch.Tensor, **kwargs):
    """Run `model(**kwargs)` and return (its output, (rows, positions) fp32 log-probs of
    `targets` where `mask`, 0 elsewhere), position t of `targets` being predicted by position t
    of the input. (output, None) when the model's logits are not its head applied to the final
    hidden states; the output then carries ordinary logits for every position."""
    head = head_of(model)
    if head is None or not _logits_are_head(model, head, kwargs["input_ids"]):
        return model(**kwargs, logits_to_keep=0), None
    with head_inputs(head) as box:
        out = model(**kwargs, logits_to_keep=0)
    hidden = box[0][:, :targets.shape[1]]
    h = hidden[mask]  # (M, H): only positions that predict a label
    picked = HeadLogps.apply(h, head.weight, targets[mask], CHUNK)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
    return out, logps.masked_scatter(mask, picked)
