"""The final norm and the LM head in fp32 on a bf16/fp16 model (the body stays reduced).

Option log-probs are differences of logits read after a softmax over the whole vocabulary; in
bf16 each logit carries ~3 significant digits, which is the size of the A/B signal labelling
reads. Running only the last norm and the head in fp32 costs one fp32 matmul per scored
position (the head is ~21% of SmolLM2's forward FLOPs, and `score` runs it only at the option
positions) and an fp32 copy of the head's weight (untied from the embedding, which stays
reduced).
"""

from __future__ import annotations


def fp32_head(model) -> bool:
    """Put `model`'s final norm and output head in fp32, in place; False (and nothing
    changed) where the model has no plain `get_decoder().norm` and output embedding."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(norm, torch.nn.Module):
        return False
    if head.weight.dtype == torch.float32:
        return True
    # a copy: with tied embeddings the input embedding keeps its reduced dtype
    head.weight = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
    if head.bias is not None:
        head.bias = torch.nn.Parameter(head.bias.detach().float(), requires_grad=False)
    norm.float()
    # the norm computes in fp32 and casts back to its input's dtype: give it fp32 input
    norm.register_forward_pre_hook(lambda _m, args: (args[0].float(), *args[1:]))
    return True
