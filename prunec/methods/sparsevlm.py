"""SparseVLM v1.5: visual tokens rated by the text tokens that relate to the image (ICML 2025).

Official code (Gumpest/SparseVLMs, branch v1.5, `modelling_sparse_llama.py` + `score.py`):
- raters, chosen once from the LLM input embeddings: P = softmax over the text tokens after the
  image of V T^T (V the visual embeddings, T those text embeddings), averaged over the visual tokens;
  the raters are the text tokens whose average exceeds the mean of the averages;
- at each pruning layer (0-indexed 2, 6, 15), that layer's attention probabilities from the rater
  rows to the visual columns, averaged over heads and raters; keep the top-k of a fixed schedule
  (for "192": 300, 200, 110 visual tokens), renumber positions (v1.5).
Not implemented: recycling (the top 30% of the deleted tokens clustered by DPC-kNN and averaged
into extra tokens): prunec drops them. v1's rank-adaptive count and v2.0's gravity correction are
not implemented either. The official code assumes batch 1; here each row has its own raters.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .attention_maps import rows_attention


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


register_method(MethodInfo(
    name="sparsevlm",
    action="prune",
    kind="score",
    signals=("text_raters",),
    fn=rater_attention,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm",),
    layer_sites_only=True,
    summary="site layer's attention from text raters (chosen once from the input embeddings); no recycling",
    source="Gumpest/SparseVLMs (v1.5) llava/model/language_model/modelling_sparse_llama.py, score.py",
))
