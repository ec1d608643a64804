"""PyramidDrop: drop image tokens in stages by the last instruction token's attention (CVPR 2025).

Official code (Cooperx521/PyramidDrop, `modeling_llama_pdrop.py::pdrop_rank_drop`): at the end of a
stage (after decoder layer l), recompute q and k with the *next* layer's `input_layernorm`, `q_proj`,
`k_proj` and RoPE on the current hidden states; the query is the last prompt token; softmax over all
keys under the layer's mask, mean over heads, keep the image columns; keep the top `ratio x original`
image tokens in their original order and renumber positions (PDrop default).

The compiler evaluates the next layer's q chain on the last token only and its k chain on every
token, so the cost is one K projection per stage, not a full attention map. A site must therefore
have a next layer.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import next_layer_row_scores
from .fastv import attention_received


def last_query_attention(q_last: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                         is_causal: bool) -> torch.Tensor:
    """Head-averaged attention of the last token over every key: [B, S] float32.

    Args:
        q_last: [B, H, 1, hd] the last token's query after RoPE. k: [B, H or H_kv, S, hd] keys after RoPE.
        mask, scale, is_causal: as the next layer's sdpa call receives them.
    """
    return attention_received(q_last, k, mask, scale, is_causal, query="last")


register_method(MethodInfo(
    name="pyramiddrop",
    lower_scores=next_layer_row_scores,
    kernel=True,
    eager_way="next_layer_rows",
    rounding="floor",
    rounding_source="PDrop official: int(N * ratio)",
    action="prune",
    kind="score",
    signals=("next_layer_qk",),
    fn=last_query_attention,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm",),
    layer_sites_only=True,
    summary="next layer's attention from the last token (recomputed q/k, head mean); top-k of image tokens",
    source="Cooperx521/PyramidDrop llava/model/modeling_llama_pdrop.py::pdrop_rank_drop",
))
