"""FasterVLM: keep the visual tokens the vision encoder's [CLS] attends to most (arXiv 2412.01818).

Official code (Theia-4869/FasterVLM, `clip_encoder.py::feature_select`, `llava_arch.py::encode_images`):
the softmax attention of the CLIP layer whose output LLaVA uses (`attentions[-2]`), [CLS] as the
query row, averaged over heads, patch columns; top-k patches, original order kept, the rest dropped.
The official code projects every token and masks afterwards, so pruning at `projector.output` is
the same selection (prunec then renumbers positions, as the LLM sees a shorter sequence). On a ViT,
a `vision.layers[i]` site scores with that layer's own [CLS] row.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import cls_row_scores
from .fastv import attention_received


def cls_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  is_causal: bool = False) -> torch.Tensor:
    """Head-mean attention of the first ([CLS]) query over every key: [B, S] float32."""
    return attention_received(q, k, mask, scale, is_causal, query="first")


register_method(MethodInfo(
    row_budgets=True,
    name="fastervlm",
    lower_scores=cls_row_scores,
    kernel=True,
    action="prune",
    kind="score",
    signals=("cls_attention",),
    fn=cls_attention,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm", "vision", "encoder"),
    layer_domains=("vision", "encoder"),  # an LLM layer has no [CLS] row; "llm" here means its pre-LLM site
    summary="[CLS] attention of the vision feature layer (head mean); top-k of image tokens",
    source="Theia-4869/FasterVLM llava/model/multimodal_encoder/clip_encoder.py::feature_select",
))
