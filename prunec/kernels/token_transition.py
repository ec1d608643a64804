"""Per-token transition of a sub-block (TransPrune's TTV): how much a token's hidden state changes.

For a sub-block with input x_in and output x_out ([B, S, D]): magnitude m = |x_out| / |x_in| and
direction cos = <x_in, x_out> / (|x_in| |x_out|) per token, then softmax over the tokens of a row of
(1 - cos) (the official code's signed variant; `abs` uses 1 - |cos|), times m. Kernel 1 reduces
BLOCK_S tokens x D features per program into (m, 1 - cos); kernel 2 is the row softmax, one program
per batch row with two passes over blocks of tokens. Statistics in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def transition_stats_kernel(x_in_ptr, x_out_ptr, valid_ptr, ratio_ptr, turn_ptr, n_tokens, features, eps,
                            stride_ib, stride_is, stride_ob, stride_os, stride_vb, stride_rb,
                            ABS_COS: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = tokens < n_tokens
    dot = tl.zeros((BLOCK_S,), tl.float32)
    sq_in = tl.zeros((BLOCK_S,), tl.float32)
    sq_out = tl.zeros((BLOCK_S,), tl.float32)
    for start in range(0, features, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = in_range[:, None] & (cols[None, :] < features)
        a = tl.load(x_in_ptr + b * stride_ib + tokens[:, None] * stride_is + cols[None, :], mask=mask, other=0.0)
        c = tl.load(x_out_ptr + b * stride_ob + tokens[:, None] * stride_os + cols[None, :], mask=mask, other=0.0)
        a = a.to(tl.float32)
        c = c.to(tl.float32)
        dot += tl.sum(a * c, axis=1)
        sq_in += tl.sum(a * a, axis=1)
        sq_out += tl.sum(c * c, axis=1)
    norm_in = tl.sqrt(sq_in)
    norm_out = tl.sqrt(sq_out)
    cos = dot / tl.maximum(norm_in * norm_out, eps)
    if ABS_COS:
        cos = tl.abs(cos)
    ratio = norm_out / tl.maximum(norm_in, eps)
    turn = 1.0 - cos
    if HAS_VALID:  # padding: out of the softmax, TTV 0
        valid = tl.load(valid_ptr + b * stride_vb + tokens, mask=in_range, other=0) != 0
        ratio = tl.where(valid, ratio, 0.0)
        turn = tl.where(valid, turn, float("-inf"))
    tl.store(ratio_ptr + b * stride_rb + tokens, ratio, mask=in_range)
    tl.store(turn_ptr + b * stride_rb + tokens, turn, mask=in_range)


@triton.jit
def weighted_softmax_kernel(turn_ptr, ratio_ptr, out_ptr, n_tokens, stride_b, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_S)
    top = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, n_tokens, BLOCK_S):
        tokens = start + offsets
        x = tl.load(turn_ptr + b * stride_b + tokens, mask=tokens < n_tokens, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top
    for start in range(0, n_tokens, BLOCK_S):
        tokens = start + offsets
        in_range = tokens < n_tokens
        x = tl.load(turn_ptr + b * stride_b + tokens, mask=in_range, other=float("-inf"))
        m = tl.load(ratio_ptr + b * stride_b + tokens, mask=in_range, other=0.0)
        tl.store(out_ptr + b * stride_b + tokens, tl.exp(x - top) / total * m, mask=in_range)


def token_transition(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None = None,
                     abs_cos: bool = False, eps: float = 1e-12, block_s: int = 16, block_d: int = 128) -> torch.Tensor:
    """[B, S, D] sub-block input and output ([B, S] bool valid tokens) -> [B, S] fp32
    softmax over valid tokens of (1 - cos), times |out| / |in|; 0 for padding."""
    batch, n_tokens, features = x_in.shape
    x_in = x_in if x_in.stride(-1) == 1 else x_in.contiguous()
    x_out = x_out if x_out.stride(-1) == 1 else x_out.contiguous()
    ratio = torch.empty((batch, n_tokens), dtype=torch.float32, device=x_in.device)
    turn = torch.empty_like(ratio)
    flags = (valid.expand(batch, n_tokens).to(torch.int8).contiguous() if valid is not None
             else ratio.new_empty((1, 1), dtype=torch.int8))
    transition_stats_kernel[(batch, triton.cdiv(n_tokens, block_s))](
        x_in, x_out, flags, ratio, turn, n_tokens, features, eps, x_in.stride(0), x_in.stride(1),
        x_out.stride(0), x_out.stride(1), flags.stride(0), ratio.stride(0), ABS_COS=abs_cos,
        HAS_VALID=valid is not None, BLOCK_S=block_s, BLOCK_D=block_d)
    out = torch.empty_like(ratio)
    weighted_softmax_kernel[(batch,)](turn, ratio, out, n_tokens, ratio.stride(0), BLOCK_S=256)
    return out

