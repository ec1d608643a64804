"""Gather along the token axis: out[b, k, :] = x[b, index[b, k], :] for [B, S, F] tensors.

Blocks of BLOCK_K rows x BLOCK_F features per program; a batch-1 input broadcasts (stride 0) over
the index rows. Used for the residual stream, rotary tables, position ids and candidate masks, and
for 4-D masks one token axis at a time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gather_rows_kernel(x_ptr, index_ptr, out_ptr, kept, features,
                       stride_xb, stride_xs, stride_ib, stride_ob, stride_ok,
                       BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_K + tl.arange(0, BLOCK_K)
    in_rows = rows < kept
    source = tl.load(index_ptr + row * stride_ib + rows, mask=in_rows, other=0)
    for start in range(0, features, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)
        mask = in_rows[:, None] & (cols[None, :] < features)
        values = tl.load(x_ptr + row * stride_xb + source[:, None] * stride_xs + cols[None, :], mask=mask)
        tl.store(out_ptr + row * stride_ob + rows[:, None] * stride_ok + cols[None, :], values, mask=mask)


def gather_rows(x: torch.Tensor, index: torch.Tensor, block_k: int = 32, block_f: int = 128) -> torch.Tensor:
    """x [B or 1, S, ...] and sorted index [B, K] -> [B, K, ...]."""
    batch, kept = index.shape
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    features = flat.shape[-1]
    index = index.contiguous()
    out = torch.empty((batch, kept, features), dtype=x.dtype, device=x.device)
    grid = (batch, triton.cdiv(kept, block_k))
    gather_rows_kernel[grid](flat, index, out, kept, features,
                             0 if flat.shape[0] == 1 else flat.stride(0), flat.stride(1), index.stride(0),
                             out.stride(0), out.stride(1), BLOCK_K=block_k, BLOCK_F=block_f)
    return out.view(batch, kept, *x.shape[2:])


def gather_rows_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch, kept = index.shape
    x = x.expand(batch, *x.shape[1:])
    return x.gather(1, index.view(batch, kept, *[1] * (x.dim() - 2)).expand(batch, kept, *x.shape[2:]))
