"""bf16 scoring with the final norm and LM head in fp32 (critique/backends/head_precision.py)."""

from __future__ import annotations

import torch

from critique.backends.head_precision import fp32_head
from critique.backends.transformers_backend import TransformersBackend

CONVS = [[{"role": "user", "content": f"Pick one: {x}. Answer A or B."}]
         for x in ("tea or coffee", "cats or dogs", "sea or hills", "now or later")]


def test_fp32_head_keeps_the_body_bf16_and_moves_scores_towards_fp32(tiny_model_dir):
    scores = {}
    for name, dtype, head in (("fp32", "float32", None), ("head", "bfloat16", True),
                              ("bf16", "bfloat16", False)):
        b = TransformersBackend(str(tiny_model_dir), dtype=dtype, fp32_head=head,
                                progress=False)
        m = b.model
        if name == "head":
            assert m.get_output_embeddings().weight.dtype == torch.float32
            assert m.get_input_embeddings().weight.dtype == torch.bfloat16  # untied copy
            assert m.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        scores[name] = torch.tensor(b.score(CONVS, [["A", "B"]] * len(CONVS)))
    err_head = (scores["head"] - scores["fp32"]).abs().max()
    err_bf16 = (scores["bf16"] - scores["fp32"]).abs().max()
    assert err_head <= err_bf16 and err_bf16 > 0


def test_fp32_head_declines_models_without_a_plain_head():
    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    assert fp32_head(NoHead()) is False
