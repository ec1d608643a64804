"""A2SF: accumulative attention with a forgetting factor (arXiv 2407.20485).

Official code (Dirac-Notation/A2SF, `policies/a2sf.py`, `policies/base.py::_topk_with_recent`): after
prefill, score_k = sum_q alpha^(L-1-q) p[q, k] (the newest query weighs 1), then keep the last
`recent` tokens always and the top rest by score. prunec applies it as a prefill token selection
at a layer site: the probabilities are summed over all heads and one selection serves every head
(the official code selects per KV head, which a shared token sequence cannot express), and the
"recent" tokens are the last `recent` candidates (they get +inf). Padding query rows weigh 0.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import attention_map_scores
from .attention_maps import attention_probs, query_validity


def forgetting_attention(qs, ks, masks, scales, is_causal: bool, valid, candidates=None, forgetting: float = 0.95,
                         recent: int = 16) -> torch.Tensor:
    """[B, S] sum over heads and queries of alpha^(S-1-q) * p[q, k]; the last `recent` candidates
    of each row ([B, S] bool `candidates`) score +inf, so they are always kept."""
    probs = attention_probs(qs[0], ks[0], masks[0], scales[0], is_causal)  # [B, H, S, S]
    seq = probs.shape[-1]
    weights = forgetting ** torch.arange(seq - 1, -1, -1, device=probs.device, dtype=torch.float32)
    rows = query_validity(valid, probs.shape[0], seq, probs.device) * weights
    score = torch.einsum("bhqk,bq->bk", probs, rows)
    if candidates is not None and recent > 0:
        from_end = candidates.flip(1).long().cumsum(1).flip(1)  # candidates at or after each position
        score = score.masked_fill(candidates & (from_end <= recent), float("inf"))
    return score


register_method(MethodInfo(
    name="a2sf",
    lower_scores=attention_map_scores,
    action="prune",
    kind="score",
    signals=("layer_attention",),
    fn=forgetting_attention,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "forgetting": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                           "description": "alpha; README example 0.95"},
            "recent": {"type": "integer", "minimum": 0, "description": "last candidates always kept; official 16"},
        },
    },
    defaults={"forgetting": 0.95, "recent": 16},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="forgetting-weighted accumulated attention with a recent window; one selection for all heads",
    source="Dirac-Notation/A2SF utils_real_drop/policies/a2sf.py",
))
