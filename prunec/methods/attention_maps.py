"""Attention probabilities recomputed from a layer's q/k inside a scoring op, for methods that need
more than one query row (full maps: SpAtten, AIM, Zero-TPrune, A2SF, HiPrune, VTC-CLS). The model
itself keeps sdpa; only the scoring op materializes the map, in fp32."""
from __future__ import annotations

import torch


def attention_logits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     is_causal: bool, first_row: int = 0) -> torch.Tensor:
    """Masked logits [B, H, R, S] of query rows first_row.. (q: [B, H, R, hd]) over every key
    (k: [B, H or H_kv, S, hd], repeated for grouped-query attention); masked entries are -inf."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        rows = mask if mask.shape[-2] == 1 else mask[..., first_row:first_row + q.shape[-2], :]
        logits = logits.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else logits + rows.float()
    if is_causal:
        row_pos = torch.arange(first_row, first_row + q.shape[-2], device=q.device)[:, None]
        logits = logits.masked_fill(torch.arange(k.shape[-2], device=q.device)[None, :] > row_pos, float("-inf"))
    return logits


def attention_probs(q, k, mask, scale, is_causal, first_row: int = 0) -> torch.Tensor:
    """Softmax of `attention_logits` over keys; a fully masked row is all zeros (not NaN)."""
    return torch.nan_to_num(torch.softmax(attention_logits(q, k, mask, scale, is_causal, first_row), dim=-1), nan=0.0)


def query_validity(valid: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """[B, S] float: 1 for a real query token, 0 for padding (all ones without a validity mask)."""
    if valid is None:
        return torch.ones(batch, seq, device=device)
    return valid.expand(batch, seq).float()


def rows_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                   rows: torch.Tensor) -> torch.Tensor:
    """Head-mean attention each key receives from the query rows marked in `rows` ([B, S] bool),
    averaged over those rows: [B, S] float32 (0 for a row marking none). Only the suffix of
    queries from the first marked row is computed, in blocks of 64 rows."""
    seq = q.shape[-2]
    marked = rows.any(dim=0).nonzero()
    first = int(marked[0]) if marked.numel() else seq - 1
    total = torch.zeros(rows.shape[0], k.shape[-2], device=q.device)
    for offset in range(first, seq, 64):
        stop = min(offset + 64, seq)
        probs = attention_probs(q[..., offset:stop, :], k, mask, scale, is_causal, offset).mean(dim=1)  # [B, R, S]
        total = total + torch.einsum("brs,br->bs", probs, rows[:, offset:stop].float())
    return total / rows.sum(dim=1, keepdim=True).clamp(min=1)
