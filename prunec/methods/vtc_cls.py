"""VTC-CLS: the [CLS] attention summed over several vision layers (arXiv 2412.05819).

Official code (THU-MIG/VTC-CLS, `clip_encoder.py::cls_token_only`): for CLIP layers L0 .. the
feature layer (`attentions[start_layer:-1]`), the head-mean [CLS] -> patch attention, summed; top-U
patches, original order. The paper speaks of "ensembling" per-layer scores; the code sums (a comment
there suggests min or max as alternatives). `start_layer` is 0-indexed; the official default is 16
on the 24-layer CLIP-L (feature layer 22).
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import attention_map_scores
from .attention_maps import attention_probs


def cls_attention_sum(qs: list[torch.Tensor], ks: list[torch.Tensor], masks: list, scales: list[float],
                      is_causal: bool, valid: torch.Tensor | None, candidates=None) -> torch.Tensor:
    """Sum over layers of the head-mean attention of query row 0 ([CLS]): [B, S] float32."""
    total = None
    for q, k, mask, scale in zip(qs, ks, masks, scales):
        row = attention_probs(q[..., :1, :], k, mask, scale, is_causal)[:, :, 0].mean(dim=1)
        total = row if total is None else total + row
    return total


register_method(MethodInfo(
    name="vtc_cls",
    lower_scores=attention_map_scores,
    action="prune",
    kind="score",
    signals=("layer_attention",),
    fn=cls_attention_sum,
    attention_layers=lambda params, scoring: list(range(params["start_layer"], scoring + 1)),
    layer_params=("start_layer",),
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "required": ["start_layer"],
        "properties": {"start_layer": {"type": "integer", "minimum": 0,
                                       "description": "first vision layer summed (0-indexed); official 16 of 24"}},
    },
    default_positions="renumber",
    domains=("llm", "vision", "encoder"),
    layer_domains=("vision", "encoder"),
    summary="[CLS] attention summed over vision layers start_layer..feature layer; top-k of image tokens",
    source="THU-MIG/VTC-CLS llava/model/multimodal_encoder/clip_encoder.py::cls_token_only",
))
