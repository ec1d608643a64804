"""Head-averaged attention probabilities of a few query rows against every key.

For each batch row b and query row r (R of them, 1 to 64 in practice: the last token, the
instruction span, [CLS]): softmax over keys of scale * q[b, h, r] . k[b, h // group, n] under the
layer's mask (additive or bool) and, optionally, causality, then the mean over heads. q and k come
after RoPE (the graph's own), so no full attention map is ever materialised. Two passes over the
keys per head (running max and sum, then normalised probabilities), accumulated over heads in one
program per (b, r), in fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def attention_rows_kernel(q_ptr, k_ptr, mask_ptr, out_ptr, heads, group, n_rows, n_keys, first_row, scale,
                          stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_kn,
                          stride_mb, stride_mr, stride_mn, stride_ob, stride_or,
                          HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    r = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    query_pos = first_row + r
    offsets = tl.arange(0, BLOCK_N)
    # pass 1, per head: running max and normaliser of the row's logits
    for h in range(0, heads):
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r * stride_qr + dims).to(tl.float32)
        k_base = k_ptr + b * stride_kb + (h // group) * stride_kh
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for start in range(0, n_keys, BLOCK_N):
            keys = start + offsets
            logits = _logits(q, k_base, keys, dims, n_keys, stride_kn, scale, mask_ptr, b, query_pos,
                             stride_mb, stride_mr, stride_mn, HAS_MASK, MASK_IS_BOOL, CAUSAL)
            new_top = tl.maximum(top, tl.max(logits, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logits - new_top), axis=0)
            top = new_top
        tl.store(out_ptr + b * stride_ob + r * stride_or + n_keys + 2 * h, top)  # scratch after the row
        tl.store(out_ptr + b * stride_ob + r * stride_or + n_keys + 2 * h + 1, total)
    # pass 2: probabilities, summed over heads, block by block of keys
    for start in range(0, n_keys, BLOCK_N):
        keys = start + offsets
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for h in range(0, heads):
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r * stride_qr + dims).to(tl.float32)
            k_base = k_ptr + b * stride_kb + (h // group) * stride_kh
            top = tl.load(out_ptr + b * stride_ob + r * stride_or + n_keys + 2 * h)
            total = tl.load(out_ptr + b * stride_ob + r * stride_or + n_keys + 2 * h + 1)
            logits = _logits(q, k_base, keys, dims, n_keys, stride_kn, scale, mask_ptr, b, query_pos,
                             stride_mb, stride_mr, stride_mn, HAS_MASK, MASK_IS_BOOL, CAUSAL)
            acc += tl.exp(logits - top) / total
        tl.store(out_ptr + b * stride_ob + r * stride_or + keys, acc / heads, mask=keys < n_keys)


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
    # each row keeps 2 x heads floats of scratch (max, normaliser) after its n_keys outputs
    out = torch.empty((batch, rows, n_keys + 2 * heads), dtype=torch.float32, device=q.device)
    if mask is not None:
        mask4 = mask.view(torch.int8) if mask.dtype == torch.bool else mask
        mask4 = mask4.expand(mask4.shape[0], 1, mask4.shape[-2], n_keys)
        if mask4.shape[-2] == 1:  # a [.., 1, S] mask serves every query row
            mask_strides = (0 if mask4.shape[0] == 1 else mask4.stride(0), 0, mask4.stride(3))
        else:
            mask_strides = (0 if mask4.shape[0] == 1 else mask4.stride(0), mask4.stride(2), mask4.stride(3))
    else:
        mask4, mask_strides = q, (0, 0, 0)
    attention_rows_kernel[(batch, rows)](
        q, k, mask4, out, heads, heads // k.shape[1], rows, n_keys, n_keys - rows, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *mask_strides, out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool, CAUSAL=is_causal,
        HEAD_DIM=head_dim, BLOCK_N=block_n)
    return out[..., :n_keys]


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
