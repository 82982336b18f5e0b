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
            gh = torch.empty_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if need_w else None
            for s in range(0, h.shape[0], ctx.chunk):
                hs, go = h[s:s + ctx.chunk], grad_out[s:s + ctx.chunk].float()
                # d/dlogits of (logit[t] - lse) = onehot(t) - softmax
                g = torch.exp((hs @ w.T).float() - lse[s:s + ctx.chunk, None])
                g.mul_(-go[:, None])
                g.scatter_add_(1, targets[s:s + ctx.chunk, None], go[:, None])
                g = g.to(ctx.dt)
                if need_h:
                    gh[s:s + ctx.chunk] = (g @ w).to(hidden.dtype)
                if need_w:
                    gw.add_((g.T @ hs).float())
        return gh, (gw.to(weight.dtype) if need_w else None), None, None


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
