"""Zero-TPrune I-stage: weighted PageRank over a layer's attention graph (CVPR 2024, arXiv 2305.17328).

Paper: per head, with A[i, j] the attention of query i to key j, start from s = 1/N and iterate
s <- A^T s (a token is important if important tokens attend to it); combine heads by root mean
square (Emphasizing Informative Region) instead of the mean. No official code was found: the
iteration counts quoted from the paper (30-50 in the first three layers, 5-10 in the middle, 1 in
the last three) are the `iterations` parameter, and the Variance-based Head Filter is optional
(`head_variance: [low, high]`, the variance of N * s over tokens; the normalization the paper uses
for its [0.01, 0.7] range is unclear, so it is off by default). The S-stage (similarity-based
pruning) is not implemented: its partition rule is unclear in the sources reached.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .attention_maps import attention_probs, query_validity


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
            "head_variance": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 2,
                              "maxItems": 2, "description": "keep heads whose var(N * s) lies in [low, high]"},
        },
    },
    defaults={"iterations": 10},
    default_positions="keep_original",
    domains=("vision", "llm", "encoder"),
    layer_sites_only=True,
    summary="weighted PageRank on the site layer's attention graph, heads combined by RMS (I-stage)",
    source="Zero-TPrune paper (CVPR 2024) §3; no official code found",
))
