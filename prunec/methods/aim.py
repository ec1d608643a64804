"""AIM in-LLM pruning: PageRank on temperature-sharpened attention (ICCV 2025, arXiv 2412.03248).

Official code (LaVi-Lab/AIM, `modeling_qwen2.py::get_importance`): from the layer's masked
pre-softmax logits, M = softmax(logits / tau) with tau = 0.1; per head s = 1/N, then s <- s M for 5
iterations (no damping); heads combined by root mean square. Text tokens are protected (prunec's
candidates are the image tokens). The official code masks pruned tokens in the attention mask and
keeps their positions; prunec drops them (a real gather) and keeps the original positions by
default. Its retain-rate schedule is the preset's budget list. Padding keys are masked and padding
query rows start at 0. AIM's pre-LLM merge (ToMe-style, unweighted) is not implemented yet.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import attention_map_scores
from .attention_maps import attention_logits, query_validity


def sharpened_pagerank(qs, ks, masks, scales, is_causal: bool, valid, candidates=None, temperature: float = 0.1,
                       iterations: int = 5) -> torch.Tensor:
    """[B, S] importance: RMS over heads of PageRank on softmax(logits / temperature)."""
    logits = attention_logits(qs[0], ks[0], masks[0], scales[0], is_causal)  # [B, H, S, S]
    sharp = torch.nan_to_num(torch.softmax(logits / temperature, dim=-1), nan=0.0)
    rows = query_validity(valid, sharp.shape[0], sharp.shape[2], sharp.device)  # [B, S]
    s = (rows / rows.sum(dim=1, keepdim=True))[:, None, :].expand(-1, sharp.shape[1], -1)
    for _ in range(iterations):
        s = torch.einsum("bhi,bhij->bhj", s, sharp)
    return (s * s).mean(dim=1).sqrt()


register_method(MethodInfo(
    name="aim",
    lower_scores=attention_map_scores,
    action="prune",
    kind="score",
    signals=("layer_attention",),
    fn=sharpened_pagerank,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "temperature": {"type": "number", "exclusiveMinimum": 0, "description": "official 0.1"},
            "iterations": {"type": "integer", "minimum": 1, "maximum": 1000, "description": "official 5"},
        },
    },
    defaults={"temperature": 0.1, "iterations": 5},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="PageRank on softmax(logits / 0.1) of the site layer, heads by RMS (AIM's in-LLM stage)",
    source="LaVi-Lab/AIM other_packages/transformers/.../qwen2/modeling_qwen2.py::get_importance",
))
