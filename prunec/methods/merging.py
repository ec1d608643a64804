"""Pieces merge methods share: averaging groups of tokens, and returning kept tokens in position order."""
from __future__ import annotations

import torch


def group_means(values: torch.Tensor, assign: torch.Tensor, groups: int) -> torch.Tensor:
    """[M, D] values, [M] group of each -> [groups, D] mean per group (0 for an empty group)."""
    sums = torch.zeros(groups, values.shape[1], device=values.device).index_add_(0, assign, values)
    counts = torch.zeros(groups, device=values.device).index_add_(0, assign, torch.ones(len(assign), device=values.device))
    return sums / counts.clamp(min=1)[:, None]


def in_position_order(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions [K] and their values [K, D], sorted by position."""
    order = index.argsort()
    return index[order], values[order]
