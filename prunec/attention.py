"""Attention rows recomputed from an sdpa call's q/k: what every attention-based score reads.

The model keeps its sdpa attention; scores recompute only the query rows they need.
"""
from __future__ import annotations

import torch


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
