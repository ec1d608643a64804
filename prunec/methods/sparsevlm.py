"""SparseVLM v1.5: visual tokens rated by the text tokens that relate to the image (ICML 2025).

Official code (Gumpest/SparseVLMs, branch v1.5, `modelling_sparse_llama.py` + `score.py`):
- raters, chosen once from the LLM input embeddings: P = softmax over the text tokens after the
  image of V T^T (V the visual embeddings, T those text embeddings), averaged over the visual tokens;
  the raters are the text tokens whose average exceeds the mean of the averages;
- at each pruning layer (0-indexed 2, 6, 15), that layer's attention probabilities from the rater
  rows to the visual columns, averaged over heads and raters; keep the top-k of a fixed schedule
  (for "192": 300, 200, 110 visual tokens), renumber positions (v1.5).
Recycling (the top 30% (+1) of the deleted tokens by score clustered by DPC-kNN and averaged into
extra tokens) is the merge method `sparsevlm_recycle`: the recycled tokens count in the stage's
budget and `clusters` is explicit (the official count is pool // 10 + 1). The density's kNN size is
the cluster count, as the official `utils.py::cluster_and_merge` computes it
(`torch.topk(dist_matrix, k=cluster_num)`); `neighbours: 5` (TCFormer's DPC-kNN, which SparseVLM's
derives from) is the variant. The official code also adds random noise to the density to break
ties; prunec does not (ties go to the lower index), so its selections are reproducible. Each
cluster token sits at its centre's position (the official code inserts them after the kept visual
tokens). v1's rank-adaptive count
and v2.0's gravity correction are not implemented. The official code assumes batch 1; here each
row has its own raters.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..candidates import row_scores_fake
from . import MethodInfo, register_method
from .lowerings import merge_by_scores
from .attention_maps import rows_attention
from .merging import group_means, in_position_order


def text_raters(embeds: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[B, S, D] LLM input embeddings, [B, S] visual candidates -> [B, S] bool rater tokens."""
    positions = torch.arange(embeds.shape[1], device=embeds.device)
    last = torch.where(candidates, positions, -1).amax(dim=1)
    raters = torch.zeros(candidates.shape, dtype=torch.bool, device=embeds.device)
    for b in range(embeds.shape[0]):
        text = positions[positions > last[b]]
        if text.numel() == 0:
            continue
        v, t = embeds[b, candidates[b]].float(), embeds[b, text].float()
        relevance = torch.softmax(v @ t.T, dim=1).mean(dim=0)  # [text tokens]
        raters[b, text[relevance > relevance.mean()]] = True
    return raters


def rater_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                    raters: torch.Tensor) -> torch.Tensor:
    """The site layer's head-mean attention from the rater rows, averaged over raters: [B, S]."""
    return rows_attention(q, k, mask, scale, is_causal, raters)


@torch.library.custom_op("prunec::text_raters", mutates_args=())
def text_raters_op(embeds: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """SparseVLM's rater tokens: [B, S] bool, from the LLM input embeddings."""
    return text_raters(embeds, candidates)


@text_raters_op.register_fake
def _(embeds, candidates):
    return candidates.new_empty(candidates.shape)


@torch.library.custom_op("prunec::rater_attention", mutates_args=())
def rater_attention_op(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float, is_causal: bool,
                    raters: torch.Tensor) -> torch.Tensor:
    """Head-mean attention from the rater rows, averaged over them: [B, S] fp32."""
    return rater_attention(q, k, mask, scale, is_causal, raters)


@rater_attention_op.register_fake
def _(q, k, mask, scale, is_causal, raters):
    return row_scores_fake(q, raters.shape[0], raters.shape[1])

def _rater_scores(b, method, params):
    """Raters are chosen once from the LLM input (text is never pruned) and carried to later stages."""
    key = (b.stage.domain, "sparsevlm:raters")
    raters = b.carried.get(key)
    if raters is None:
        raters = b.add("score", torch.ops.prunec.text_raters.default, (b.signal("text_raters", method), b.candidates))
        b.carried[key] = b.rows(raters, torch.bool)
    a = b.signal("attention_qk", method)
    return b.add("score", torch.ops.prunec.rater_attention.default, (a.q, a.k, a.mask, a.scale, a.causal, raters))


register_method(MethodInfo(
    name="sparsevlm",
    lower_scores=_rater_scores,
    action="prune",
    kind="score",
    signals=("text_raters", "attention_qk"),
    fn=rater_attention,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm",),
    layer_sites_only=True,
    summary="site layer's attention from text raters (chosen once from the input embeddings); no recycling",
    source="Gumpest/SparseVLMs (v1.5) llava/model/language_model/modelling_sparse_llama.py, score.py",
))


def recycle_merge(features: torch.Tensor, scores: torch.Tensor, n_keep: int, clusters: int = 1,
                  ratio: float = 0.3, neighbours: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's recycling, per row: keep the top n_keep - clusters candidates by score; of the
    deleted ones, the top ratio (+1) by score are clustered by DPC-kNN (density = exp(-mean squared
    distance to the `neighbours` nearest, default `clusters` as the official code), distance to the nearest denser token, centres = the top
    `clusters` by density x distance, every token to its nearest centre) and averaged per cluster;
    each cluster's token sits at its centre's position. Ties go to the lower index.
    features: [B, N, D], scores: [B, N]. Returns ([B, n_keep] sorted indices, [B, n_keep, D] values)."""
    batch, n, width = features.shape
    n_top = n_keep - clusters
    rows_index, rows_values = [], []
    for b in range(batch):
        order = torch.sort(scores[b].float(), descending=True, stable=True).indices
        top, deleted = order[:n_top], order[n_top:]
        pool = deleted[:min(deleted.numel(), int(ratio * deleted.numel()) + 1)]
        x = features[b, pool].float()
        distance = torch.cdist(x, x) / width ** 0.5
        k = min(neighbours or clusters, pool.numel())
        density = torch.exp(-(distance.topk(k, dim=1, largest=False).values ** 2).mean(dim=1))
        denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
        parent = torch.where(denser, distance, distance.max()).min(dim=1).values
        centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
        assign = distance[:, centres].argmin(dim=1)
        assign[centres] = torch.arange(clusters, device=x.device)
        index, values = in_position_order(torch.cat([top, pool[centres]]),
                                          torch.cat([features[b, top].float(), group_means(x, assign, clusters)]))
        rows_index.append(index)
        rows_values.append(values)
    return torch.stack(rows_index), torch.stack(rows_values).to(features.dtype)


register_method(MethodInfo(
    name="sparsevlm_recycle",
    lower_scores=_rater_scores,
    lower_select=merge_by_scores,
    action="merge",
    kind="merge",
    signals=("text_raters", "attention_qk"),
    fn=recycle_merge,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "required": ["clusters"],
        "properties": {
            "clusters": {"type": "integer", "minimum": 1,
                         "description": "recycled tokens, counted in the budget (official: pool // 10 + 1)"},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                      "description": "share of the deleted tokens recycled, plus one (official 0.3)"},
            "neighbours": {"type": "integer", "minimum": 1,
                           "description": "k of DPC-kNN's density; default: the cluster count (official code)"},
        },
    },
    defaults={"ratio": 0.3},
    variants={"neighbours": "the cluster count (code) / 5 (TCFormer's DPC-kNN)"},
    default_positions="renumber",
    domains=("llm",),
    layer_sites_only=True,
    summary="SparseVLM with recycling: rater scores keep the top tokens, DPC-kNN clusters of the best deleted ones",
    source="Gumpest/SparseVLMs (v1.5) llava/model/language_model/modelling_sparse_llama.py, utils.py::cluster_and_merge",
))
