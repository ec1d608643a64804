"""DivPrune's greedy max-min loop in one launch: every step's min-distance update and argmax.

The torch loop costs several kernel launches per kept token; here one program per batch row keeps
each token's distance to the chosen set in registers and, per step, reads one row of the cosine
distance matrix (computed once by a matmul), folds it in with a minimum, and takes the argmax over
the tokens not yet chosen (ties to the lower index, like torch's argmax).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def max_min_greedy_kernel(distance_ptr, first_ptr, out_ptr, n_tokens, n_keep, stride_db, stride_dr, stride_ob,
                          BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n_tokens
    first = tl.load(first_ptr + b)
    tl.store(out_ptr + b * stride_ob, first)
    nearest = tl.load(distance_ptr + b * stride_db + first * stride_dr + cols, mask=valid, other=float("-inf"))
    taken = cols == first
    for step in range(1, n_keep):
        pick = tl.argmax(tl.where(taken | ~valid, float("-inf"), nearest), axis=0, tie_break_left=True)
        tl.store(out_ptr + b * stride_ob + step, pick.to(tl.int64))
        taken = taken | (cols == pick)
        row = tl.load(distance_ptr + b * stride_db + pick * stride_dr + cols, mask=valid, other=float("-inf"))
        nearest = tl.minimum(nearest, row)


def max_min_greedy(distance: torch.Tensor, first: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Same contract as `prunec.methods.divprune.greedy_max_min`: [B, n_keep] indices in pick order."""
    batch, n_tokens, _ = distance.shape
    distance = distance.contiguous()
    out = torch.empty((batch, n_keep), dtype=torch.int64, device=distance.device)
    max_min_greedy_kernel[(batch,)](distance, first.contiguous(), out, n_tokens, n_keep, distance.stride(0),
                                    distance.stride(1), out.stride(0), BLOCK_N=triton.next_power_of_2(n_tokens))
    return out
