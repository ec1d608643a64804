"""One launch gathering the kept tokens of several tensors: the residual stream, position ids,
candidate masks and rotary tables of a stage, whatever their dtypes and widths.

Each tensor is seen as rows of machine words along its token axis (dim 1); a table of pointers,
row widths and strides (int64, built per call) lets one program per (tensor, batch row, block of
kept rows) copy its words. The word is the widest of 8 / 4 / 2 / 1 bytes that divides every
tensor's row, strides and addresses, so hidden states copy in 8-byte words; tensors that need a
narrower word (a bool mask) go in a second launch of the same kernel. A batch-1 tensor (rotary
tables) broadcasts over the index rows (batch stride 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def gather_many_kernel(table_ptr, index_ptr, kept, stride_ib,
                       WORD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr):
    slot = tl.program_id(0)
    row = tl.program_id(1)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = ks < kept
    entry = table_ptr + slot * 5  # source, destination, row words, source batch stride, source token stride
    if WORD == 8:
        kind = tl.pointer_type(tl.int64)
    elif WORD == 4:
        kind = tl.pointer_type(tl.int32)
    elif WORD == 2:
        kind = tl.pointer_type(tl.int16)
    else:
        kind = tl.pointer_type(tl.int8)
    src = tl.load(entry).to(kind)
    dst = tl.load(entry + 1).to(kind)
    words = tl.load(entry + 2)
    src_batch = tl.load(entry + 3)
    src_token = tl.load(entry + 4)
    source = tl.load(index_ptr + row * stride_ib + ks, mask=in_k, other=0)
    src_rows = src + row * src_batch + source * src_token          # [BLOCK_K] row starts
    dst_rows = dst + (row * kept + ks) * words                      # outputs are contiguous [B, K, words]
    for start in range(0, words, BLOCK_W):
        cols = start + tl.arange(0, BLOCK_W)
        mask = in_k[:, None] & (cols[None, :] < words)
        values = tl.load(src_rows[:, None] + cols[None, :], mask=mask)
        tl.store(dst_rows[:, None] + cols[None, :], values, mask=mask)


def _word(t: torch.Tensor, out: torch.Tensor) -> int:
    size = t.element_size()
    row = size * (t[0, 0].numel() if t.dim() > 1 else 1)
    facts = (row, t.stride(0) * size, t.stride(1) * size, t.data_ptr(), out.data_ptr())
    return next(w for w in (8, 4, 2, 1) if all(f % w == 0 for f in facts))


def gather_many(tensors: list[torch.Tensor], index: torch.Tensor, block_k: int = 16,
                block_w: int = 128) -> list[torch.Tensor]:
    """Each x [B or 1, S, ...] -> [B, K, ...] at the sorted keep indices [B, K], in one launch per
    word width."""
    batch, kept = index.shape
    index = index.contiguous()
    sources = [t if t[0].is_contiguous() else t.contiguous() for t in tensors]
    outs = [torch.empty((batch, kept, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in sources]
    groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for t, out in zip(sources, outs):
        groups.setdefault(_word(t, out), []).append((t, out))
    for word, pairs in groups.items():
        table = []
        for t, out in pairs:
            size = t.element_size()
            row_words = size * (t[0, 0].numel() if t.dim() > 1 else 1) // word
            table += [t.data_ptr(), out.data_ptr(), row_words,
                      0 if t.shape[0] == 1 else t.stride(0) * size // word, t.stride(1) * size // word]
        table = torch.tensor(table, dtype=torch.int64).to(index.device)
        grid = (len(pairs), batch, triton.cdiv(kept, block_k))
        gather_many_kernel[grid](table, index, kept, index.stride(0), WORD=word, BLOCK_K=block_k, BLOCK_W=block_w)
    return outs
