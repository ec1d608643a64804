"""Top-k among each row's candidates, plus every non-candidate, as sorted keep indices.

One program per batch row over the whole (power-of-two padded) row: sort the candidates' scores to
find the k-th largest, keep the candidates above it and, among those equal to it, the lowest
indices first (the torch path's stable order), keep every non-candidate, then compact the kept
positions with a prefix sum. Ragged spans are just candidate masks; padding is a non-candidate
or a candidate with a low score, as the adapter decides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def topk_spans_kernel(scores_ptr, candidates_ptr, out_ptr, n_tokens, n_keep, stride_sb, stride_cb, stride_ob,
                      BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    positions = tl.arange(0, BLOCK_S)
    in_range = positions < n_tokens
    score = tl.load(scores_ptr + b * stride_sb + positions, mask=in_range, other=float("-inf")).to(tl.float32)
    candidate = tl.load(candidates_ptr + b * stride_cb + positions, mask=in_range, other=0) != 0
    key = tl.where(candidate, score, float("-inf"))
    ranked = tl.sort(key, descending=True)
    threshold = tl.sum(tl.where(positions == n_keep - 1, ranked, 0.0), axis=0)
    above = candidate & (score > threshold)
    tied = candidate & (score == threshold)
    room = n_keep - tl.sum(above.to(tl.int32), axis=0)
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room)) | (in_range & ~candidate)
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + b * stride_ob + slot, positions.to(tl.int64), mask=keep)


def topk_spans(scores: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int) -> torch.Tensor:
    """scores [B, S] (finite or -inf), candidates [B, S] bool holding n_candidates per row ->
    [B, S - n_candidates + n_keep] int64 sorted keep indices."""
    batch, n_tokens = scores.shape  # the caller has checked the candidate count of every row
    scores = scores.contiguous()
    flags = candidates.contiguous().view(torch.int8)
    out = torch.empty((batch, n_tokens - n_candidates + n_keep), dtype=torch.int64, device=scores.device)
    topk_spans_kernel[(batch,)](scores, flags, out, n_tokens, n_keep, scores.stride(0), flags.stride(0),
                                out.stride(0), BLOCK_S=triton.next_power_of_2(n_tokens))
    return out
