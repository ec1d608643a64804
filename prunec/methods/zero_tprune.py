"""Zero-TPrune I-stage: weighted PageRank over a layer's attention graph (CVPR 2024, arXiv 2305.17328).

Paper: per head, with A[i, j] the attention of query i to key j, start from s = 1/N and iterate
s <- A^T s (a token is important if important tokens attend to it); combine heads by root mean
square (Emphasizing Informative Region) instead of the mean. No official code was found: the
iteration counts quoted from the paper (30-50 in the first three layers, 5-10 in the middle, 1 in
the last three) are the `iterations` parameter, and the Variance-based Head Filter is optional
(`head_variance: [low, high]`, the variance of N * s over tokens; the normalization the paper uses
for its [0.01, 0.7] range is unclear, so it is off by default).

`zero_tprune_si` adds the S-stage before the I-stage inside one pruning layer (I' -> S -> I), as
described in a secondary account of the paper's section 3 (the paper's text was not reachable;
`MahdiarKhodabakhshi/Zero-TPrune` is not the authors' code and computes no similarity):
I' is the PageRank above with one iteration ("one vote"); it sorts the candidates and splits them
into the more important half B (the larger half for an odd count: unclear) and the rest A; each A
token's similarity is its largest cosine similarity to a B token on the layer's keys (head mean:
unclear, ToMe's convention); the r_s most similar A tokens are pruned (dropped, not merged; ties:
the lower index first). The I-stage then runs the PageRank on the attention graph of the tokens
left: their keys only (rows renormalized), the walk starting uniform over them, so the pruned
similar tokens no longer vote for each other. How r splits between S and I is unclear:
`similarity_share` of the stage's removals go to S (half up, at most |A|), the rest to I.
"""
from __future__ import annotations

import torch

import math

from . import MethodInfo, register_method
from .lowerings import attention_map_scores, select_by_attention
from .attention_maps import attention_probs, query_validity


HEAD_VARIANCE_SCHEMA = {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2, "maxItems": 2,
                        "description": "keep heads whose var(N * s) lies in [low, high]"}


def weighted_pagerank(qs, ks, masks, scales, is_causal: bool, valid, candidates=None, iterations: int = 10,
                      head_variance: list[float] | None = None) -> torch.Tensor:
    """[B, S] importance: RMS over (kept) heads of each head's PageRank vector after `iterations`.
    The walk starts uniform over the real tokens: padding rows hold no importance to pass on."""
    probs = attention_probs(qs[0], ks[0], masks[0], scales[0], is_causal)  # [B, H, S, S]
    rows = query_validity(valid, probs.shape[0], probs.shape[2], probs.device)  # [B, S]
    real = rows.sum(dim=1, keepdim=True)  # N per row
    s = (rows / real)[:, None, :].expand(-1, probs.shape[1], -1)  # [B, H, S]
    for _ in range(iterations):
        s = torch.einsum("bhij,bhi->bhj", probs, s)
    keep = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
    if head_variance is not None:  # var(N * s) over the real tokens
        scaled = real[:, None, :] * s
        mean = (scaled * rows[:, None]).sum(-1) / real
        variance = ((scaled - mean[..., None]) ** 2 * rows[:, None]).sum(-1) / real
        keep = (variance >= head_variance[0]) & (variance <= head_variance[1])
        keep = keep | ~keep.any(dim=1, keepdim=True)  # no head passes: use them all
    squares = torch.where(keep[..., None], s * s, 0.0)
    return (squares.sum(dim=1) / keep.sum(dim=1, keepdim=True)).sqrt()


register_method(MethodInfo(
    name="zero_tprune",
    lower_scores=attention_map_scores,
    action="prune",
    kind="score",
    signals=("layer_attention",),
    fn=weighted_pagerank,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "iterations": {"type": "integer", "minimum": 1, "maximum": 1000,
                           "description": "PageRank steps: 30-50 early layers, 5-10 middle, 1 last three (paper)"},
            "head_variance": HEAD_VARIANCE_SCHEMA,
        },
    },
    defaults={"iterations": 10},
    default_positions="keep_original",
    domains=("vision", "llm", "encoder"),
    layer_sites_only=True,
    summary="weighted PageRank on the site layer's attention graph, heads combined by RMS (I-stage)",
    source="Zero-TPrune paper (CVPR 2024) §3; no official code found",
))


def similarity_then_importance_keep(qs, ks, masks, scales, is_causal: bool, n_candidates: int, n_keep: int,
                                    iterations: int = 10, similarity_share: float = 0.5,
                                    head_variance: list[float] | None = None) -> torch.Tensor:
    """The S-stage then the I-stage over the last n_candidates tokens (the patches) of one layer's
    attention; returns [B, n_keep] sorted candidate indices."""
    batch, seq = ks[0].shape[0], ks[0].shape[2]
    lead = seq - n_candidates
    pre = weighted_pagerank(qs, ks, masks, scales, is_causal, None, iterations=1,
                            head_variance=head_variance)[:, lead:]
    n_similar = min(math.floor(similarity_share * (n_candidates - n_keep) + 0.5), n_candidates // 2)
    keys = torch.nn.functional.normalize(ks[0].float().mean(dim=1)[:, lead:], dim=-1)  # [B, N, d]
    survivors = torch.ones(batch, seq, dtype=torch.bool, device=ks[0].device)
    for b in range(batch):
        order = torch.sort(pre[b], descending=True, stable=True).indices
        half = n_candidates - n_candidates // 2  # B, the more important half, takes an odd count's extra
        important, rest = order[:half], order[half:].sort().values
        best = (keys[b, rest] @ keys[b, important].T).max(dim=1).values
        pruned = rest[torch.sort(best, descending=True, stable=True).indices[:n_similar]]
        survivors[b, lead + pruned] = False
    base, left = masks[0], survivors[:, None, None, :]
    if base is None:
        mask = left
    else:
        mask = base & left if base.dtype == torch.bool else base.masked_fill(~left, float("-inf"))
    importance = weighted_pagerank(qs, ks, [mask], scales, is_causal, survivors, iterations=iterations,
                                   head_variance=head_variance)[:, lead:]
    importance = importance.masked_fill(~survivors[:, lead:], float("-inf"))
    return torch.sort(importance, dim=1, descending=True, stable=True).indices[:, :n_keep].sort(dim=1).values


register_method(MethodInfo(
    name="zero_tprune_si",
    lower_select=select_by_attention,
    action="prune",
    kind="select",
    signals=("layer_attention",),
    fn=similarity_then_importance_keep,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "iterations": {"type": "integer", "minimum": 1, "maximum": 1000,
                           "description": "I-stage PageRank steps (the pre-ranking I' takes one)"},
            "similarity_share": {"type": "number", "minimum": 0, "maximum": 1,
                                 "description": "share of the stage's removals made by the S-stage (unclear in "
                                                "the paper; at most half the candidates)"},
            "head_variance": HEAD_VARIANCE_SCHEMA,
        },
    },
    defaults={"iterations": 10, "similarity_share": 0.5},
    default_positions="keep_original",
    domains=("vision",),
    layer_sites_only=True,
    summary="S-stage (drop A-half tokens most similar to the important half, by keys) then I-stage PageRank",
    source="Zero-TPrune paper (CVPR 2024) §3 via a secondary account; no official code found",
))
