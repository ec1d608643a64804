"""VFlowOpt: calibrated attention importance, then pruned tokens recycled per grid cell (ICCV 2025,
arXiv 2508.05211). Pre-LLM form of the official code (sihany077/VFlowOpt, LLaVA-OneVision:
`multimodal_encoder/siglip_encoder.py` for the importance, `language_model/llava_qwen_training_free.py`
for the recycling).

Importance, from one vision layer's head-mean attention A (all S tokens as queries and keys): each
token's received attention r_j = mean_i A_ij; the "relatively important" queries G = {i : r_i >
t * mean(r)}; I_j = mean over i in G of A_ij for every patch j. Recycling: the patches (raster
order on a square grid) are cut into a x a cells (`cell`, in patches; ceil(side / a)^2 cells); the
pruned patches of a cell merge into one I-weighted average (weights I / sum I) that takes the place
of the cell's highest-I pruned patch, the carrier; the cell's other pruned patches are dropped.
Released configuration (10% budget): t = 39.26, a = 17.39; entropy weight alpha_v = 0 in every
released config, so the pixel-entropy term is not implemented.
Deviations, for a fixed token count: the official code prunes `reduce + floor(N / a^2)` patches
and revives one carrier per non-empty cell, so its count varies by one or two per image; prunec
keeps the top `n_keep - cells` patches by I directly and tops up cells without pruned patches
with the next highest-I pruned patches (kept as themselves, out of their cell's average), so every
row keeps exactly `n_keep`. An empty G (no query passes the threshold) falls back to every query
(the official code takes a mean over the empty set, NaN). The pixel-entropy term is off (alpha_v = 0)
in every released config and is not implemented (the code computes it on the normalized pixels
cast to uint8, wrapping negative values).

In-LLM stages (`vflowopt_llm`, official `Qwen2Model.forward_illava`): at the chosen LLM layers the
remaining image tokens are ranked by the same vision importance I, computed once before the LLM
and carried with the tokens (a recycled carrier keeps its own I), not by LLM attention; the
lowest go, positions kept. The released 10% config keeps [1.0, 0.6011] of the image tokens left at
LLM layers 9 and 18 (LLaVA-OneVision), each ratio of what reaches the layer.
"""
from __future__ import annotations

import math

import torch

from . import MethodInfo, register_method
from .attention_maps import attention_probs
from .merging import in_position_order


def calibrated_importance(probs: torch.Tensor, n: int, threshold: float) -> torch.Tensor:
    """probs: [B, H, S, S]; returns [B, n] importance of the last n keys (the patches)."""
    mean_heads = probs.float().mean(dim=1)  # [B, S, S]
    received = mean_heads.mean(dim=1)  # [B, S]: r_j
    important = received > threshold * received.mean(dim=1, keepdim=True)  # queries in G
    important = important | ~important.any(dim=1, keepdim=True)  # none passes: every query
    weights = important.float() / important.sum(dim=1, keepdim=True)
    return torch.einsum("bi,bij->bj", weights, mean_heads)[:, -n:]


def importance_over_sequence(qs, ks, masks, scales, is_causal: bool, candidates: torch.Tensor, n_candidates: int,
                             threshold: float = 39.26) -> torch.Tensor:
    """[B, S] the importance I of each candidate (image token) at its sequence position, 0 elsewhere
    (qs/ks: the scoring vision layer's; its last n_candidates keys are the candidates in order)."""
    probs = attention_probs(qs[0], ks[0], masks[0], scales[0], is_causal)
    importance = calibrated_importance(probs, n_candidates, threshold)
    positions = candidates.nonzero()[:, 1].view(candidates.shape[0], n_candidates)
    return torch.zeros(candidates.shape, device=importance.device).scatter(1, positions, importance)


def cells_of(n: int, cell: float, device) -> tuple[torch.Tensor, int]:
    """(cell id of each of n raster-order patches on a square grid, number of cells)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"vflowopt recycles over a square patch grid; {n} tokens are not one")
    per_side = math.ceil(side / cell)
    rows = torch.arange(n, device=device) // side
    cols = torch.arange(n, device=device) % side
    return (rows / cell).floor().long() * per_side + (cols / cell).floor().long(), per_side * per_side


def recycle(features: torch.Tensor, n_keep: int, qs, ks, masks, scales, is_causal: bool,
            threshold: float = 39.26, cell: float = 17.39) -> tuple[torch.Tensor, torch.Tensor]:
    """features: [B, N, D] patch tokens; qs/ks: the chosen vision layer's, over [lead + N] keys.
    Returns ([B, n_keep] sorted kept indices, [B, n_keep, D] their values)."""
    n = features.shape[1]
    importance = calibrated_importance(attention_probs(qs[0], ks[0], masks[0], scales[0], is_causal), n, threshold)
    cell_id, n_cells = cells_of(n, cell, features.device)
    if n_keep < n_cells:
        raise ValueError(f"vflowopt keeps {n_keep} tokens, fewer than its {n_cells} grid cells")
    rows_index, rows_values = [], []
    for b in range(features.shape[0]):
        score, values = importance[b], features[b].float()
        order = torch.sort(score, descending=True, stable=True).indices  # ties: lower index
        direct, pruned = order[:n_keep - n_cells].tolist(), order[n_keep - n_cells:].tolist()
        groups: dict[int, list[int]] = {}
        for p in pruned:  # in descending importance: each group's first member is its carrier
            groups.setdefault(int(cell_id[p]), []).append(p)
        spare = [p for members in groups.values() for p in members[1:]]
        spare.sort(key=lambda p: (-float(score[p]), p))
        extra = set(spare[:n_cells - len(groups)])  # top-up for cells with nothing pruned
        index, value = [*direct, *extra], [values[p] for p in (*direct, *extra)]
        for members in groups.values():
            members = [p for p in members if p not in extra]
            weight = score[members]
            weight = weight / weight.sum() if float(weight.sum()) > 0 else torch.full_like(weight, 1 / len(members))
            index.append(members[0])
            value.append((weight[:, None] * values[members]).sum(dim=0))
        kept, merged = in_position_order(torch.tensor(index, device=features.device), torch.stack(value))
        rows_index.append(kept)
        rows_values.append(merged)
    return torch.stack(rows_index), torch.stack(rows_values).to(features.dtype)


register_method(MethodInfo(
    name="vflowopt",
    action="merge",
    kind="merge",
    signals=("hidden", "layer_attention"),
    fn=recycle,
    attention_layers=lambda params, scoring: [params.get("vision_layer", scoring)],
    layer_params=("vision_layer",),
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "vision_layer": {"type": "integer", "minimum": 0,
                             "description": "0-indexed vision layer whose attention scores (default: the feature "
                                            "layer; official SigLIP: illava_vit_k 25)"},
            "threshold": {"type": "number", "minimum": 0,
                          "description": "t: queries receiving more than t x the mean attention form G (39.26)"},
            "cell": {"type": "number", "exclusiveMinimum": 0,
                     "description": "a: grid cell side in patches for recycling (17.39)"},
        },
    },
    defaults={"threshold": 39.26, "cell": 17.39},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="importance from calibrated vision attention; pruned tokens recycled per grid cell into the top one",
    source="sihany077/VFlowOpt src/LLaVA-OneVision/llava/model/{multimodal_encoder/siglip_encoder.py, "
           "language_model/llava_qwen_training_free.py}",
))


register_method(MethodInfo(
    name="vflowopt_llm",
    action="prune",
    kind="score",
    signals=("vision_importance",),
    fn=importance_over_sequence,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="VFlowOpt's in-LLM stage: the image tokens left, ranked by the vflowopt stage's vision importance",
    source="sihany077/VFlowOpt src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py "
           "(Qwen2Model.forward_illava)",
))
