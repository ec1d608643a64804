"""HiPrune: anchors, their neighbours, and registers from two vision layers (arXiv 2508.00553).

Official code (Danielement321/HiPrune, `llava_arch.py::encode_images`): per layer, the attention a
patch receives averaged over heads and over every query ([CLS] included), patch columns.
1. anchors: the top round(N' * alpha / 5) patches by the *object* layer's attention;
2. buffers: each anchor's 4-neighbours on the patch grid (+-1, +-width, clamped to [0, N-1], no
   row-wrap check, as in the code), de-duplicated;
3. registers: the remaining N' - |anchors + buffers| patches by the *deep* (feature) layer's
   attention among those not yet chosen.
The kept set returns in position order. `object_layer` is 0-indexed here (the code's
HIPRUNE_OBJECT_LAYER is 1-indexed: its default 9 is `object_layer: 8`). Rounding follows Python's
`round` (half to even). Where anchors + buffers exceed N' (tiny budgets), the anchors come first,
then buffers in anchor order, cut at N' (the code would exceed its budget there).
The grid width is the square root of the candidate count: a square patch grid.
"""
from __future__ import annotations

import math

import torch

from . import MethodInfo, register_method
from .lowerings import select_by_attention
from .attention_maps import attention_probs


def received_attention(q, k, mask, scale, is_causal) -> torch.Tensor:
    """[B, S] attention each key receives, mean over heads and over every query row."""
    return attention_probs(q, k, mask, scale, is_causal).mean(dim=(1, 2))


def hiprune_keep(qs, ks, masks, scales, is_causal, n_candidates: int, n_keep: int, alpha: float = 0.1) -> torch.Tensor:
    """qs/ks: [object layer, deep layer]. Returns [B, n_keep] sorted indices into the last
    n_candidates keys (the patches, raster order)."""
    width = math.isqrt(n_candidates)
    if width * width != n_candidates:
        raise ValueError(f"hiprune needs a square patch grid, got {n_candidates} candidates")
    obj, deep = (received_attention(q, k, m, s, is_causal)[:, -n_candidates:]
                 for q, k, m, s in zip(qs, ks, masks, scales))
    n_anchors = round(n_keep * alpha / 5)
    rows = []
    for b in range(obj.shape[0]):
        anchors = torch.sort(obj[b], descending=True, stable=True).indices[:n_anchors].tolist()
        chosen = list(anchors)
        for a in anchors:
            for n in (a - 1, a + 1, a - width, a + width):
                n = min(max(n, 0), n_candidates - 1)
                if n not in chosen:
                    chosen.append(n)
        chosen = chosen[:n_keep]
        rest = deep[b].clone()
        rest[chosen] = float("-inf")
        registers = torch.sort(rest, descending=True, stable=True).indices[:n_keep - len(chosen)].tolist()
        rows.append(sorted(chosen + registers))
    return torch.tensor(rows, dtype=torch.long, device=obj.device)


register_method(MethodInfo(
    name="hiprune",
    lower_select=select_by_attention,
    action="prune",
    kind="select",
    signals=("layer_attention",),
    fn=hiprune_keep,
    attention_layers=lambda params, scoring: [params["object_layer"], scoring],
    layer_params=("object_layer",),
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "required": ["object_layer"],
        "properties": {
            "object_layer": {"type": "integer", "minimum": 0,
                             "description": "0-indexed vision layer for anchors (official 1-indexed 9 -> 8)"},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                      "description": "share of the budget for anchors + buffers (official 0.1)"},
        },
    },
    defaults={"alpha": 0.1},
    default_positions="renumber",
    domains=("llm", "vision"),
    layer_domains=("vision",),  # a patch grid: not text
    summary="anchors by a middle layer's received attention + grid neighbours + registers by the feature layer's",
    source="Danielement321/HiPrune LLaVA/llava/model/llava_arch.py::encode_images",
))
