"""SpAtten cascade token pruning: cumulative attention received (HPCA 2021, arXiv 2012.09852).

Paper: a token's importance is the attention probability it receives, summed over heads and query
rows, accumulated over layers (and, in generation, steps); pruning cascades: a token removed at one
layer stays removed. In prunec each stage sums the layers from `accumulate_from` (default: the site
layer) up to its site and carries the sum to the next SpAtten stage, gathered like the sequence.
Padding query rows contribute nothing. Head pruning, progressive quantization and local V pruning
(the accelerator's parts) are not token selection and are not implemented.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import attention_map_scores
from .attention_maps import attention_probs, query_validity


def cumulative_attention(qs, ks, masks, scales, is_causal: bool, valid: torch.Tensor | None,
                         candidates=None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the given layers, heads and valid query rows of the attention probabilities, added
    to `prior` (an earlier stage's sum over the same tokens): [B, S]."""
    total = prior
    for q, k, mask, scale in zip(qs, ks, masks, scales):
        probs = attention_probs(q, k, mask, scale, is_causal)  # [B, H, S, S]
        rows = query_validity(valid, probs.shape[0], probs.shape[2], probs.device)
        layer = torch.einsum("bhqk,bq->bk", probs, rows)
        total = layer if total is None else total + layer
    return total


register_method(MethodInfo(
    name="spatten",
    lower_scores=attention_map_scores,
    action="prune",
    kind="score",
    signals=("layer_attention",),
    fn=cumulative_attention,
    attention_layers=lambda params, scoring: [scoring],
    accumulates=True,
    layer_params=("accumulate_from",),
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"accumulate_from": {"type": "integer", "minimum": 0,
                                           "description": "first layer (0-indexed) whose attention is summed"}},
    },
    default_positions="keep_original",
    domains=("llm", "vision", "encoder"),
    layer_sites_only=True,
    summary="cascade pruning by attention received, summed over heads, queries and layers",
    source="SpAtten paper §3 (token importance); mit-han-lab/spatten-llm spatten_llm/kv_cache_token_pruning.py",
))
