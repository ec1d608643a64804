"""Candidate bookkeeping shared by every selection op: where a row's candidates sit, their rows, and
keep indices that add back every non-candidate (so all rows keep the same count)."""
from __future__ import annotations

import torch


def check_count(candidates: torch.Tensor, n_candidates: int) -> None:
    counts = candidates.sum(dim=1)
    if bool((counts != n_candidates).any()):
        raise ValueError(
            f"prunec: this module was built for {n_candidates} candidate tokens per row "
            f"(budgets are resolved at build time), but the rows hold {counts.tolist()}"
        )


def candidate_positions(candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[B, S] bool -> [B, n_candidates] sorted positions; every row must hold n_candidates."""
    check_count(candidates, n_candidates)
    return candidates.nonzero()[:, 1].view(candidates.shape[0], n_candidates)


def candidate_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, S, D] hidden states -> [B, N, D] rows of the candidates at `positions` ([B, N])."""
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def merged_back(hidden: torch.Tensor, positions: torch.Tensor, local: torch.Tensor, merged: torch.Tensor):
    """A copy of `hidden` whose surviving candidates (`local` into `positions`) hold `merged`."""
    rows = positions.gather(1, local)
    return hidden.clone().scatter_(1, rows[..., None].expand(-1, -1, hidden.shape[-1]), merged.to(hidden.dtype))


def keep_indices(candidates: torch.Tensor, positions: torch.Tensor, local_keep: torch.Tensor) -> torch.Tensor:
    """Union of the non-candidates and the kept candidates, as sorted [B, K] sequence indices."""
    keep = ~candidates
    keep = keep.scatter(1, positions.gather(1, local_keep), True)
    kept = candidates.shape[1] - positions.shape[1] + local_keep.shape[1]
    return keep.nonzero()[:, 1].reshape(candidates.shape[0], kept).clone()  # own storage, offset 0


def keep_shape(candidates: torch.Tensor, n_candidates: int, n_keep: int) -> torch.Tensor:
    batch, seq = candidates.shape
    return candidates.new_empty((batch, seq - n_candidates + n_keep), dtype=torch.long)


def row_scores_fake(like: torch.Tensor, batch: int, seq) -> torch.Tensor:
    return like.new_empty((batch, seq), dtype=torch.float32)


def scatter_rows(values: torch.Tensor, positions: torch.Tensor, seq: int) -> torch.Tensor:
    """[B, N] per-candidate values at `positions` -> [B, seq] fp32, 0 elsewhere."""
    out = values.new_zeros((values.shape[0], seq), dtype=torch.float32)
    return out.scatter_(1, positions, values.float())
