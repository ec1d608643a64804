"""Head-averaged attention probabilities of a few query rows against every key.

For each batch row b and query row r (R of them, 1 to 64 in practice: the last token, the
instruction span, [CLS]): softmax over keys of scale * q[b, h, r] . k[b, h // group, n] under the
layer's mask (additive or bool) and, optionally, causality, then the mean over heads. q and k come
after RoPE (the graph's own), so no full attention map is ever materialised. Two passes over the
keys, parallel over key blocks: kernel 1 writes each (row, head, key block)'s max logit and sum of
exponentials; kernel 2, per (row, key block), combines them into each head's normaliser and sums
the block's probabilities over heads. fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def attention_rows_partial_kernel(q_ptr, k_ptr, mask_ptr, stats_ptr, rows, group, n_keys, first_row, scale,
                                  stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kn,
                                  stride_mb, stride_mr, stride_mn, stride_sr, stride_sh,
                                  HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (row, head, key block): the block's max logit and sum of exp(logit - max)."""
    row_id = tl.program_id(0)
    h = tl.program_id(1)
    block = tl.program_id(2)
    b = row_id // rows
    r = row_id % rows
    dims = tl.arange(0, HEAD_DIM)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r * stride_qr + dims).to(tl.float32)
    logits = _logits(q, k_ptr + b * stride_kb + (h // group) * stride_kh, keys, dims, n_keys, stride_kn, scale,
                     mask_ptr, b, first_row + r, stride_mb, stride_mr, stride_mn, HAS_MASK, MASK_IS_BOOL, CAUSAL)
    top = tl.max(logits, axis=0)
    total = tl.sum(tl.exp(logits - top), axis=0)
    total = tl.where(top == float("-inf"), 0.0, total)  # a block with no attendable key adds nothing
    tl.store(stats_ptr + row_id * stride_sr + h * stride_sh + 2 * block, top)
    tl.store(stats_ptr + row_id * stride_sr + h * stride_sh + 2 * block + 1, total)


@triton.jit
def attention_rows_probs_kernel(q_ptr, k_ptr, mask_ptr, stats_ptr, out_ptr, heads, rows, group, n_keys, n_blocks,
                                first_row, scale, stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kn,
                                stride_mb, stride_mr, stride_mn, stride_sr, stride_sh, stride_or,
                                HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Per (row, key block): combine every block's statistics into the row's softmax normaliser,
    then sum the block's probabilities over heads and divide by the head count."""
    row_id = tl.program_id(0)
    block = tl.program_id(1)
    b = row_id // rows
    r = row_id % rows
    dims = tl.arange(0, HEAD_DIM)
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for h in range(0, heads):
        base = stats_ptr + row_id * stride_sr + h * stride_sh
        tops = tl.load(base + 2 * blocks, mask=blocks < n_blocks, other=float("-inf"))
        totals = tl.load(base + 2 * blocks + 1, mask=blocks < n_blocks, other=0.0)
        top = tl.max(tops, axis=0)
        total = tl.sum(tl.where(tops == float("-inf"), 0.0, totals * tl.exp(tops - top)), axis=0)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r * stride_qr + dims).to(tl.float32)
        logits = _logits(q, k_ptr + b * stride_kb + (h // group) * stride_kh, keys, dims, n_keys, stride_kn, scale,
                         mask_ptr, b, first_row + r, stride_mb, stride_mr, stride_mn, HAS_MASK, MASK_IS_BOOL, CAUSAL)
        acc += tl.exp(logits - top) / total  # a row with no attendable key gives NaN, as softmax does
    tl.store(out_ptr + row_id * stride_or + keys, acc / heads, mask=keys < n_keys)


@triton.jit
def _logits(q, k_base, keys, dims, n_keys, stride_kn, scale, mask_ptr, b, query_pos,
            stride_mb, stride_mr, stride_mn, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
            CAUSAL: tl.constexpr):
    in_range = keys < n_keys
    k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=in_range[:, None], other=0.0)
    logits = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + query_pos * stride_mr + keys * stride_mn, mask=in_range, other=0)
        if MASK_IS_BOOL:
            logits = tl.where(m != 0, logits, float("-inf"))
        else:
            logits = logits + m.to(tl.float32)
    if CAUSAL:
        logits = tl.where(keys <= query_pos, logits, float("-inf"))
    return tl.where(in_range, logits, float("-inf"))


def attention_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                   block_n: int = 64) -> torch.Tensor:
    """q [B, H, R, hd] (the last R query positions), k [B, H_kv, S, hd], mask broadcastable to
    [B, 1, S, S] -> head-mean probabilities [B, R, S] in fp32."""
    batch, heads, rows, head_dim = q.shape
    n_keys = k.shape[-2]
    if head_dim & (head_dim - 1):
        raise ValueError(f"attention_rows needs a power-of-two head_dim, got {head_dim}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    n_blocks = triton.cdiv(n_keys, block_n)
    stats = torch.empty((batch * rows, heads, 2 * n_blocks), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, rows, n_keys), dtype=torch.float32, device=q.device)
    if mask is not None:
        mask4 = mask.view(torch.int8) if mask.dtype == torch.bool else mask
        mask4 = mask4.expand(mask4.shape[0], 1, mask4.shape[-2], n_keys)
        row_stride = 0 if mask4.shape[-2] == 1 else mask4.stride(2)  # a [.., 1, S] mask serves every row
        mask_strides = (0 if mask4.shape[0] == 1 else mask4.stride(0), row_stride, mask4.stride(3))
    else:
        mask4, mask_strides = q, (0, 0, 0)
    common = dict(HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
                  CAUSAL=is_causal, HEAD_DIM=head_dim, BLOCK_N=block_n)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *mask_strides,
               stats.stride(0), stats.stride(1))
    group, first_row = heads // k.shape[1], n_keys - rows
    attention_rows_partial_kernel[(batch * rows, heads, n_blocks)](
        q, k, mask4, stats, rows, group, n_keys, first_row, scale, *strides, **common)
    attention_rows_probs_kernel[(batch * rows, n_blocks)](
        q, k, mask4, stats, out, heads, rows, group, n_keys, n_blocks, first_row, scale, *strides,
        out.stride(1), BLOCK_B=triton.next_power_of_2(n_blocks), **common)
    return out


def attention_rows_torch(q, k, mask, scale, is_causal):
    """The reference: matmul, mask, softmax, mean over heads -> [B, R, S] fp32."""
    rows, n_keys = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        rows_mask = mask if mask.shape[-2] == 1 else mask[..., n_keys - rows:, :]
        logits = logits.masked_fill(~rows_mask, float("-inf")) if rows_mask.dtype == torch.bool else logits + rows_mask.float()
    if is_causal:
        positions = torch.arange(n_keys - rows, n_keys, device=q.device)[:, None]
        logits = logits.masked_fill(torch.arange(n_keys, device=q.device)[None, :] > positions, float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
