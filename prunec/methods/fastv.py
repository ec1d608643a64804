"""FastV: keep the image tokens that receive the most attention at layer K (ECCV 2024).

Official code (pkunlp-icler/FastV, `LlamaModel.forward`): after the K-th decoder layer, take that
layer's attention probabilities, average over heads, read the row of the *last* query token, and
keep the top (1-R) share of the image columns; original RoPE positions are kept.
The paper instead averages the attention each token receives over *all* queries: `query: all`.

In prunec the site `llm.layers[i]` is "after 0-indexed decoder layer i", so the official
"K = 2" is `llm.layers[1]`.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method


def attention_received(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                       is_causal: bool, query: str = "last") -> torch.Tensor:
    """Head-averaged attention each key receives from the chosen queries.

    Args:
        q: [B, H, R, hd] queries after RoPE for the last R positions (R = S, or 1 when only the
            last row was computed). k: [B, H or H_kv, S, hd] keys after RoPE.
        mask: None, or a bool (True = attend) / additive float mask broadcastable to [B, H, S, S].
        scale: softmax scale. is_causal: apply a causal mask on top of `mask`.
        query: "last" (official code: the last row), "all" (paper: mean over every query that
            attends to at least one key) or "first" (the [CLS] row of an encoder).
    Returns: [B, S] float32 scores.
    """
    seq = k.shape[-2]
    if k.shape[1] != q.shape[1]:  # grouped-query attention with un-repeated KV heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = {"last": q[..., -1:, :], "first": q[..., :1, :]}.get(query, q)
    first_row = 0 if query == "first" else seq - rows.shape[-2]
    logits = torch.matmul(rows.float(), k.float().transpose(-1, -2)) * scale  # [B, H, R, S]
    if mask is not None:
        # [.., 1, S] masks broadcast
        mask_rows = mask if mask.shape[-2] == 1 else mask[..., first_row:first_row + rows.shape[-2], :]
        if mask_rows.dtype == torch.bool:
            logits = logits.masked_fill(~mask_rows, float("-inf"))
        else:
            logits = logits + mask_rows.float()
    if is_causal:
        row_pos = torch.arange(first_row, seq, device=q.device)[:, None]
        col_pos = torch.arange(seq, device=q.device)[None, :]
        logits = logits.masked_fill(col_pos > row_pos, float("-inf"))
    return reduce_rows(torch.softmax(logits, dim=-1).mean(dim=1), query)


def reduce_rows(probs: torch.Tensor, query: str) -> torch.Tensor:
    """[B, R, S] head-mean attention rows -> [B, S]: the last (or first) row, or the mean over the
    rows that attend to at least one key (a fully masked row, e.g. left padding, is NaN and left out)."""
    if query in ("last", "first"):
        return probs[:, -1] if query == "last" else probs[:, 0]
    valid = ~torch.isnan(probs).any(dim=-1, keepdim=True)
    probs = torch.where(valid, probs, torch.zeros_like(probs))
    return probs.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


register_method(MethodInfo(
    name="fastv",
    action="prune",
    kind="score",
    signals=("attention_qk",),
    fn=attention_received,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "query": {"enum": ["last", "all"],
                      "description": "last = official code (last token's row); all = paper (mean over queries)"},
        },
    },
    defaults={"query": "last"},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="attention received at the site layer (last query, head mean); top-k of image tokens",
    source="pkunlp-icler/FastV src/transformers/.../modeling_llama.py::LlamaModel.forward",
    variants={"query": "last (code) / all (paper)"},
))
