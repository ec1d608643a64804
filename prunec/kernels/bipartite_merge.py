"""ToMe's two heavy steps: bipartite matching and the size-weighted merge.

`bipartite_match`: for every A token, its most similar B token and that similarity, from
L2-normalized metrics, fused: one program per (batch row, block of A rows) streams B in blocks,
computes the similarity tile with `tl.dot` (IEEE fp32, no TF32, so scores match torch's matmul to
rounding) and keeps a running max / argmax, so the [A, B] similarity matrix is never written.
Ties go to the lower B index (first within a tile, strict improvement across tiles), as torch's max.

`merge_into`: the size-weighted average of every merged A token into its B partner. Sources are
added into an fp32 copy of hidden * size with atomic adds (several A tokens may share a partner),
then divided by the summed sizes; the result equals torch's scatter_add up to summation order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def bipartite_match_kernel(a_ptr, b_ptr, best_ptr, partner_ptr, n_a, n_b, dim,
                           stride_ab, stride_an, stride_bb, stride_bn, stride_ob,
                           BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    a_rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = a_rows < n_a
    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    partner = tl.zeros((BLOCK_A,), tl.int64)
    for b_start in range(0, n_b, BLOCK_B):
        b_rows = b_start + tl.arange(0, BLOCK_B)
        in_b = b_rows < n_b
        sim = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
        for d_start in range(0, dim, BLOCK_D):
            d = d_start + tl.arange(0, BLOCK_D)
            in_d = d < dim
            a = tl.load(a_ptr + row * stride_ab + a_rows[:, None] * stride_an + d[None, :],
                        mask=in_a[:, None] & in_d[None, :], other=0.0)
            b = tl.load(b_ptr + row * stride_bb + b_rows[:, None] * stride_bn + d[None, :],
                        mask=in_b[:, None] & in_d[None, :], other=0.0)
            sim += tl.dot(a, tl.trans(b), input_precision="ieee")
        sim = tl.where(in_b[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_arg = tl.argmax(sim, axis=1, tie_break_left=True).to(tl.int64) + b_start
        better = tile_best > best
        partner = tl.where(better, tile_arg, partner)
        best = tl.where(better, tile_best, best)
    tl.store(best_ptr + row * stride_ob + a_rows, best, mask=in_a)
    tl.store(partner_ptr + row * stride_ob + a_rows, partner, mask=in_a)


def bipartite_match(a: torch.Tensor, b: torch.Tensor, block_a: int = 32, block_b: int = 32,
                    block_d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """a [B, NA, D], b [B, NB, D] fp32 -> (best similarity [B, NA] fp32, partner [B, NA] int64)."""
    a, b = a.float().contiguous(), b.float().contiguous()
    batch, n_a, dim = a.shape
    best = torch.empty((batch, n_a), dtype=torch.float32, device=a.device)
    partner = torch.empty((batch, n_a), dtype=torch.int64, device=a.device)
    grid = (batch, triton.cdiv(n_a, block_a))
    bipartite_match_kernel[grid](a, b, best, partner, n_a, b.shape[1], dim, a.stride(0), a.stride(1),
                                 b.stride(0), b.stride(1), best.stride(0),
                                 BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d)
    return best, partner


@triton.jit
def merge_add_kernel(hidden_ptr, size_ptr, src_ptr, dst_ptr, acc_ptr, size_acc_ptr, n_src, width,
                     stride_hb, stride_hs, stride_sb, stride_ib, stride_ab, stride_as,
                     BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0)
    pairs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = pairs < n_src
    src = tl.load(src_ptr + row * stride_ib + pairs, mask=in_r, other=0)
    dst = tl.load(dst_ptr + row * stride_ib + pairs, mask=in_r, other=0)
    weight = tl.load(size_ptr + row * stride_sb + src, mask=in_r, other=0.0)
    tl.atomic_add(size_acc_ptr + row * stride_sb + dst, weight, mask=in_r)
    for start in range(0, width, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)
        mask = in_r[:, None] & (cols[None, :] < width)
        values = tl.load(hidden_ptr + row * stride_hb + src[:, None] * stride_hs + cols[None, :], mask=mask, other=0.0)
        tl.atomic_add(acc_ptr + row * stride_ab + dst[:, None] * stride_as + cols[None, :],
                      values.to(tl.float32) * weight[:, None], mask=mask)


def merge_into(hidden: torch.Tensor, size: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
               block_r: int = 16, block_f: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of rows `src` [B, R] into rows `dst` [B, R] of hidden [B, S, D]:
    (merged hidden, full length, in hidden's dtype; summed sizes [B, S] fp32)."""
    hidden, size = hidden.contiguous(), size.float().contiguous()
    acc = hidden.float() * size[..., None]
    size_acc = size.clone()
    src, dst = src.contiguous(), dst.contiguous()
    batch, n_src = src.shape
    grid = (batch, triton.cdiv(n_src, block_r))
    merge_add_kernel[grid](hidden, size, src, dst, acc, size_acc, n_src, hidden.shape[-1], hidden.stride(0),
                           hidden.stride(1), size.stride(0), src.stride(0), acc.stride(0), acc.stride(1),
                           BLOCK_R=block_r, BLOCK_F=block_f)
    return (acc / size_acc[..., None]).to(hidden.dtype), size_acc

