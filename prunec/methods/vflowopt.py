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
(the official code takes a mean over the empty set, NaN).
Pixel entropy (`entropy_weight`, the code's alpha_v; 0 in every released config, the default here):
I_j += alpha_v x softmax over the image's patches of H_j, H_j the base-2 entropy of the 256-bin
histogram of patch j's grey levels. As in the code (`SigLipVisionEmbeddings.forward`), the levels
come from the pixel values the vision tower receives (normalized), times 255 and cast to 8 bits
(truncated, negatives wrapping), grey = round(0.3333 x (R + G + B)).

In-LLM stages (`vflowopt_llm`, official `Qwen2Model.forward_illava`): at the chosen LLM layers the
remaining image tokens are ranked by the same vision importance I, computed once before the LLM
and carried with the tokens (a recycled carrier keeps its own I), not by LLM attention; the
lowest go, positions kept. The released 10% config keeps [1.0, 0.6011] of the image tokens left at
LLM layers 9 and 18 (LLaVA-OneVision), each ratio of what reaches the layer.
"""
from __future__ import annotations

import math

from typing import List, Optional

import torch

from ..candidates import check_count, row_scores_fake
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


def patch_entropy(pixels: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] base-2 entropy of each patch's grey-level histogram (pixels: [B, 3, H, W], n patches on
    a square grid, raster order)."""
    side = math.isqrt(n)
    levels = torch.trunc(pixels.float() * 255).long() % 256  # the code's uint8 cast
    grey = torch.round((levels.float() * 0.3333).sum(dim=1)).long()  # [B, H, W]
    size = grey.shape[-1] // side
    patches = grey.unfold(1, size, size).unfold(2, size, size).reshape(grey.shape[0], n, size * size)
    counts = torch.zeros(grey.shape[0], n, 256, device=grey.device).scatter_add_(
        2, patches, torch.ones(patches.shape, device=grey.device))
    p = counts / (size * size)
    return -(p * torch.log2(p + 1e-10)).sum(dim=-1)


def vision_scores(qs, ks, masks, scales, is_causal: bool, n: int, threshold: float, pixels: torch.Tensor | None,
                  entropy_weight: float) -> torch.Tensor:
    """[B, n] the importance I of the patches (the last n keys of the scoring layer)."""
    importance = calibrated_importance(attention_probs(qs[0], ks[0], masks[0], scales[0], is_causal), n, threshold)
    if entropy_weight:
        importance = importance + entropy_weight * torch.softmax(patch_entropy(pixels, n), dim=-1)
    return importance


def importance_over_sequence(qs, ks, masks, scales, is_causal: bool, candidates: torch.Tensor, n_candidates: int,
                             threshold: float = 39.26, pixels: torch.Tensor | None = None,
                             entropy_weight: float = 0.0) -> torch.Tensor:
    """[B, S] the importance I of each candidate (image token) at its sequence position, 0 elsewhere
    (qs/ks: the scoring vision layer's; its last n_candidates keys are the candidates in order)."""
    importance = vision_scores(qs, ks, masks, scales, is_causal, n_candidates, threshold, pixels, entropy_weight)
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
            threshold: float = 39.26, cell: float = 17.39, pixels: torch.Tensor | None = None,
            entropy_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """features: [B, N, D] patch tokens; qs/ks: the chosen vision layer's, over [lead + N] keys;
    pixels: the vision tower's input. Returns ([B, n_keep] sorted kept indices, [B, n_keep, D] their values)."""
    n = features.shape[1]
    importance = vision_scores(qs, ks, masks, scales, is_causal, n, threshold, pixels, entropy_weight)
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


@torch.library.custom_op("prunec::vision_importance", mutates_args=())
def vision_importance_op(qs: List[torch.Tensor], ks: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                      scales: List[float], is_causal: bool, candidates: torch.Tensor, n_candidates: int,
                      threshold: float, pixels: Optional[torch.Tensor], entropy_weight: float) -> torch.Tensor:
    """[B, S] fp32 VFlowOpt importance of each candidate at its position (0 elsewhere)."""
    check_count(candidates, n_candidates)
    return importance_over_sequence(qs, ks, masks, scales, is_causal, candidates, n_candidates, threshold, pixels,
                                    entropy_weight)


@vision_importance_op.register_fake
def _(qs, ks, masks, scales, is_causal, candidates, n_candidates, threshold, pixels, entropy_weight):
    return row_scores_fake(qs[0], candidates.shape[0], candidates.shape[1])

def _produce(b, signal: str):
    """The vision importance of every image token (0 elsewhere), for a later in-LLM stage; full
    length: propagate_tokens gathers it with the tokens."""
    a = b.signal("layer_attention")
    params = b.stage.param_dict
    importance = b.add("score", torch.ops.prunec.vision_importance.default,
                       (a.qs, a.ks, a.masks, a.scales, a.causal, b.candidates, b.n_candidates,
                        params["threshold"], b.signal("pixels"), params["entropy_weight"]))
    return b.rows(importance)


def _carried_importance(b, method, params):
    return b.signal("vision_importance", method)


def _check_budget(params: dict, available: int, n_keep: int, adapter, protect, images: int
                  ) -> tuple[str, str] | None:
    """Recycling into one carrier per grid cell: a square grid, and at least one token per cell."""
    side = math.isqrt(available)
    if side * side != available:
        return f"vflowopt recycles over a square patch grid; {available} candidates are not one", "site"
    cells = math.ceil(side / params["cell"]) ** 2
    if n_keep < cells:
        return (f"vflowopt keeps one token per grid cell at least: {cells} cells of {params['cell']:g} patches "
                f"on a {side} x {side} grid, budget {n_keep}", "keep")
    return None


register_method(MethodInfo(
    name="vflowopt",
    produces=("vision_importance",),
    produce=_produce,
    check_budget=_check_budget,
    action="merge",
    kind="merge",
    signals=("hidden", "layer_attention", "pixels"),
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
            "entropy_weight": {"type": "number", "minimum": -1, "maximum": 1,
                               "description": "alpha_v: weight of the softmaxed patch pixel entropy (0 in every "
                                              "released config)"},
        },
    },
    defaults={"threshold": 39.26, "cell": 17.39, "entropy_weight": 0.0},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="importance from calibrated vision attention; pruned tokens recycled per grid cell into the top one",
    source="sihany077/VFlowOpt src/LLaVA-OneVision/llava/model/{multimodal_encoder/siglip_encoder.py, "
           "language_model/llava_qwen_training_free.py}",
))


register_method(MethodInfo(
    name="vflowopt_llm",
    lower_scores=_carried_importance,
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
