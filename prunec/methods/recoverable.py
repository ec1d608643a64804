"""Recoverable Compression: a [CLS]-attention filter, then text-guided recovery (AAAI 2025, arXiv 2409.01179).

Official code (banjiuyufen/RecoverableCompression, read in its mirror DamonZhao-sfu/RecoverableCompression:
`llava/model/multimodal_encoder/clip_encoder.py::token_recycling_with_text_in_vision_and_clustring`):
1. visual filter: a_j = attention of [CLS] to patch j at the vision layer that reads the feature map
   (CLIP-L layer 23 for the penultimate-layer features), one softmax over every head's dimensions
   jointly (q.k / sqrt(H d); `heads: joint`, the official code; `heads: mean` averages per-head maps).
   How many survive is adaptive: the Local Outlier Factor of the 1-D values a with 20 neighbours
   flags outliers (LOF > 1.5, scikit-learn's `contamination='auto'`); their count k_v is how many
   of the top patches by a are kept.
2. text-guided recovery: the other patches most similar (cosine) to the question are recovered.
Deviations, all for prunec's static shapes or its model: the stage's budget is the total, so the
text recovery fills `n_keep - k_v` (the code sizes it by a second LOF count, so its total varies
per image; `visual_share` fixes k_v to a share of the budget instead). The text is the mean LLM
embedding of the tokens after the image, compared with the projected image tokens (the code
embeds the prompt's first line with CLIP's text tower, which HF LLaVA does not ship); a row
without such text keeps its top `n_keep` by a. Ties go to the lower index.
Not implemented: step 3, merging the rest into "centres". The paper's KNN-clustering merge is
unclear, and the code's version gathers keys with indices local to the remainder (mis-aligned)
and sizes its centre count by the hidden size, so neither gives a rule to follow.
"""
from __future__ import annotations

import math

import torch

from . import MethodInfo, register_method
from .lowerings import select_by_attention
from .attention_maps import attention_probs

LOF_THRESHOLD = 1.5  # scikit-learn's offset for contamination='auto'


def cls_attention(q: torch.Tensor, k: torch.Tensor, mask, scale: float, n: int, heads: str) -> torch.Tensor:
    """[B, n] attention of the first query ([CLS]) to the last n keys, softmax over every key."""
    if heads == "mean":
        return attention_probs(q[:, :, :1], k, mask, scale, False)[:, :, 0].mean(dim=1)[:, -n:]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhd,bhsd->bs", q[:, :, 0].float(), k.float()) / math.sqrt(q.shape[1] * q.shape[-1])
    return torch.softmax(logits, dim=-1)[:, -n:]


def local_outlier_count(values: torch.Tensor, neighbours: int) -> torch.Tensor:
    """[B] number of entries of each row of `values` ([B, N]) whose Local Outlier Factor over the
    row's 1-D values exceeds 1.5, with min(neighbours, N - 1) nearest neighbours (self excluded)."""
    x = values.double()
    k = min(neighbours, x.shape[1] - 1)
    distance = (x[:, :, None] - x[:, None, :]).abs()
    distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    near, index = distance.topk(k, dim=2, largest=False)  # [B, N, k], nearest first
    k_distance = near[..., -1]
    reach = torch.maximum(near, k_distance.gather(1, index.flatten(1)).view_as(index))
    density = 1.0 / (reach.mean(dim=-1) + 1e-10)
    factor = density.gather(1, index.flatten(1)).view_as(index).mean(dim=-1) / density
    return (factor > LOF_THRESHOLD).sum(dim=1)


def recover_keep(qs, ks, masks, scales, is_causal, n_candidates: int, n_keep: int, features: torch.Tensor,
                 text: torch.Tensor, neighbours: int = 20, visual_share: float | None = None,
                 heads: str = "joint") -> torch.Tensor:
    """qs/ks: the vision layer reading the features (query 0 is [CLS]); features: [B, N, D] candidate
    tokens; text: [B, D] mean text embedding (zeros: none). Returns [B, n_keep] sorted indices."""
    attention = cls_attention(qs[0], ks[0], masks[0], scales[0], n_candidates, heads)
    if visual_share is None:
        n_visual = local_outlier_count(attention, neighbours).clamp(max=n_keep).tolist()
    else:
        n_visual = [min(n_keep, math.floor(visual_share * n_keep + 0.5))] * attention.shape[0]
    has_text = text.abs().sum(dim=-1) > 0
    similarity = torch.nn.functional.cosine_similarity(features.double(), text.double()[:, None], dim=-1)
    rows = []
    for b in range(attention.shape[0]):
        order = torch.sort(attention[b], descending=True, stable=True).indices
        if not has_text[b]:
            rows.append(order[:n_keep].sort().values)
            continue
        visual = order[:n_visual[b]]
        rest = similarity[b].index_fill(0, visual, float("-inf"))
        recovered = torch.sort(rest, descending=True, stable=True).indices[:n_keep - n_visual[b]]
        rows.append(torch.cat([visual, recovered]).sort().values)
    return torch.stack(rows)


register_method(MethodInfo(
    name="recoverable",
    lower_select=select_by_attention,
    action="prune",
    kind="select",
    signals=("layer_attention", "hidden"),
    fn=recover_keep,
    attention_layers=lambda params, scoring: [scoring + 1],  # the layer whose input is the features
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "neighbours": {"type": "integer", "minimum": 1,
                           "description": "Local Outlier Factor neighbours for the visual count (official 20)"},
            "visual_share": {"type": "number", "minimum": 0, "maximum": 1,
                             "description": "fixed share of the budget kept by [CLS] attention instead of the "
                                            "LOF outlier count"},
            "heads": {"enum": ["joint", "mean"],
                      "description": "joint: one softmax over all heads' dimensions (official); mean: head mean"},
        },
    },
    defaults={"neighbours": 20, "heads": "joint"},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    paired_text=True,
    variants={"heads": "joint (official) / mean"},
    summary="[CLS] attention of the layer after the features, LOF-sized; the rest of the budget by similarity "
            "to the text after the image",
    source="banjiuyufen/RecoverableCompression llava/model/multimodal_encoder/clip_encoder.py "
           "(token_recycling_with_text_in_vision_and_clustring); step 3 merge not implemented",
))
