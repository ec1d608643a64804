"""AIM's pre-LLM token merging: ToMe-style bipartite matching with an unweighted mean (ICCV 2025).

Official code (LaVi-Lab/AIM, `llava/model/token_merge.py::bipartite_soft_matching_merge`, called
twice in `llava_arch.py`): metric = the visual features, L2-normalized; set A = even positions, B =
odd; every A token finds its most similar B token (cosine); the r A tokens with the highest match
merge into their B partner by `scatter_reduce(mean)` including the destination (no size tracking);
r = N/2, then N/4 of the original count, so 25% remain. prunec repeats rounds, each merging at most
all of A, until `n_keep` tokens remain. Ties go to the lower index. Merged tokens stay at their B
partner's position (the official code concatenates [unmerged A, B]; with its default rounds every A
merges, so the orders agree).
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method


def bipartite_mean_merge(features: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, D] candidate features -> ([B, n_keep] sorted surviving indices, [B, n_keep, D] merged)."""
    batch, n, _ = features.shape
    index = torch.arange(n, device=features.device).expand(batch, n)
    values = features.float()
    while values.shape[1] > n_keep:
        current = values.shape[1]
        a, b = values[:, 0::2], values[:, 1::2]
        r = min(a.shape[1], current - n_keep)
        metric = torch.nn.functional.normalize(values, dim=-1)
        similarity = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
        best, partner = similarity.max(dim=-1)  # max returns the first (lowest) index on ties
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=1).values
        dst = partner.gather(1, merged_a)
        width = values.shape[-1]
        sums = b.clone().scatter_add_(1, dst[..., None].expand(-1, -1, width), a.gather(1, merged_a[..., None].expand(-1, -1, width)))
        counts = torch.ones(b.shape[:2], device=values.device).scatter_add_(1, dst, torch.ones(dst.shape, device=values.device))
        b = sums / counts[..., None]
        # survivors in position order: the unmerged A tokens and every B token
        positions = torch.cat([index[:, 0::2].gather(1, kept_a), index[:, 1::2]], dim=1)
        stacked = torch.cat([a.gather(1, kept_a[..., None].expand(-1, -1, width)), b], dim=1)
        order = positions.argsort(dim=1)
        index = positions.gather(1, order)
        values = stacked.gather(1, order[..., None].expand(-1, -1, width))
    return index, values.to(features.dtype)


register_method(MethodInfo(
    name="aim_merge",
    action="merge",
    kind="merge",
    signals=("hidden",),
    fn=bipartite_mean_merge,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    summary="bipartite matching (A even, B odd, cosine of features), unweighted mean into B, rounds to n_keep",
    source="LaVi-Lab/AIM llava/model/token_merge.py::bipartite_soft_matching_merge",
))
