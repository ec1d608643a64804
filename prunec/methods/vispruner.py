"""VisPruner: important tokens by [CLS] attention, then diverse tokens by dropping duplicates in rounds
(ICCV 2025, arXiv 2412.01818 v2; the successor of FasterVLM).

Official code (Theia-4869/VisPruner `llava_arch.py::encode_images`, `clip_encoder.py`, read through
METHODS-2.md §3): per image, `T_imp = int(T x important_ratio)` patches with the highest head-mean
[CLS] attention of the vision feature layer are kept; the rest, in descending-attention order, lose
duplicates in rounds until `T - T_imp` remain: split the list alternately into A (even places) and B
(odd places), score each A token by its largest cosine similarity to a B token on the *pre-projector*
features, drop the `min(per_round, remaining - target)` highest-scoring A tokens, and continue with
[surviving A in descending score, then B]. Kept tokens enter the LLM in position order (renumbered).

Towers without [CLS] (`importance: mean_received`): the official repository's SigLIP path scores a
patch by the attention it receives averaged over every query row and head, `(1/(H N)) sum_h sum_i
A_h[i, j]` (METHODS-2.md §3e, its tower's last layer, which SigLIP-based LLaVAs read as the feature
layer). prunec computes it on the feature layer the [CLS] form reads, every query row included (the
[CLS] row too, where the tower has one), so the variant runs on a LLaVA checkpoint as it would on a
[CLS]-free tower.

Deviation, on purpose: with an odd list length the official indexing broadcasts only in corner cases
and otherwise raises (METHODS-2.md §3c); prunec scores every A token, which is what the official code
computes whenever it runs. The official LLaVA budgets (576 - T_imp even) never meet this. With
`important_ratio: 1` the official loop never runs and every remaining token is kept; prunec keeps
the budget (the important tokens only).
"""
from __future__ import annotations

import torch

from .. import ops
from ..candidates import candidate_positions, keep_indices, keep_shape
from ..lowering import Selection
from . import MethodInfo, register_method


def important_diverse(scores: torch.Tensor, features: torch.Tensor, n_keep: int, important_ratio: float = 0.5,
                      per_round: int = 8) -> torch.Tensor:
    """One image. scores: [N] [CLS] attention; features: [N, D] pre-projector. Returns [n_keep] sorted indices."""
    n_important = int(n_keep * important_ratio)
    n_diverse = n_keep - n_important
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    important, rest = order[:n_important], order[n_important:]
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    while n_diverse > 0 and rest.numel() > n_diverse:
        drop = min(per_round, rest.numel() - n_diverse)
        a, b = rest[0::2], rest[1::2]
        duplicated = (normed[a] @ normed[b].T).max(dim=1).values
        ranked = torch.sort(duplicated, descending=True, stable=True).indices
        rest = torch.cat([a[ranked[drop:]], b])
    if n_diverse == 0:
        rest = rest[:0]
    return torch.cat([important, rest]).sort().values


@torch.library.custom_op("prunec::select_vispruner", mutates_args=())
def select_vispruner(cls_rows: torch.Tensor, features: torch.Tensor, candidates: torch.Tensor, n_candidates: int,
                     n_keep: int, images: int, important_ratio: float, per_round: int) -> torch.Tensor:
    """cls_rows [crops, lead + N] head-mean [CLS] attention, features [crops, N, D]: crop `b x images + m` is
    row b's image m, whose N candidates come m-th in the row. Keeps `n_keep / images` per image."""
    positions = candidate_positions(candidates, n_candidates)
    batch, per, keep = candidates.shape[0], n_candidates // images, n_keep // images
    if features.shape[0] != batch * images or features.shape[1] != per:
        raise ValueError(f"prunec: VisPruner expects {images} image(s) of {per} patches per row, got vision features "
                         f"{tuple(features.shape)} for {batch} rows")
    scores = cls_rows[:, -per:]
    local = [torch.cat([important_diverse(scores[b * images + m], features[b * images + m], keep, important_ratio,
                                          per_round) + m * per for m in range(images)])
             for b in range(batch)]
    return keep_indices(candidates, positions, torch.stack(local).to(candidates.device))


@select_vispruner.register_fake
def _(cls_rows, features, candidates, n_candidates, n_keep, images, important_ratio, per_round):
    return keep_shape(candidates, n_candidates, n_keep)


ops.keep_index_op("select_vispruner")


def _lower_select(b) -> Selection:
    attention, _ = b.signal("cls_attention")
    params = b.stage.param_dict
    query = "first" if params["importance"] == "cls" else "all"  # the [CLS] row, or every row's mean
    row = b.add("score", torch.ops.prunec.attention_received.default,
                (attention.q, attention.k, attention.mask, attention.scale, attention.causal, query))
    return Selection(b.add("select", torch.ops.prunec.select_vispruner.default,
                           (row, b.signal("vision_features"), b.candidates, *b.sizes, b.images_per_row,
                            float(params["important_ratio"]), int(params["per_round"]))))


register_method(MethodInfo(
    name="vispruner",
    action="prune",
    kind="select",
    signals=("cls_attention", "vision_features"),
    fn=important_diverse,
    lower_select=_lower_select,
    per_image=True,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "important_ratio": {"type": "number", "minimum": 0, "maximum": 1,
                                "description": "share of each image's budget kept by [CLS] attention (int() of it)"},
            "per_round": {"type": "integer", "minimum": 1,
                          "description": "duplicates dropped per matching round at most (official 8)"},
            "importance": {"enum": ["cls", "mean_received"],
                           "description": "what ranks the important tokens: the feature layer's head-mean [CLS] "
                                          "row (cls), or the attention each patch receives averaged over every "
                                          "query row and head (mean_received: the official SigLIP path, for "
                                          "towers without [CLS])"},
        },
    },
    defaults={"important_ratio": 0.5, "per_round": 8, "importance": "cls"},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="[CLS]-attention important tokens + diverse tokens by alternate-split duplicate dropping (pre-projector "
            "cosine), per image",
    source="Theia-4869/VisPruner llava/model/llava_arch.py::encode_images",
    variants={"important_ratio": "0.5 (README vqav2 128 0.5) / 0.75 (README mme 64 0.75)",
              "importance": "cls (CLIP path, default) / mean_received (SigLIP path, siglip_encoder.py::feature_select)"},
    rounding="half_even",
    rounding_source="official takes a count T; LightCompress vispruner.py: T = round(N (1 - prune_ratio))",
))
