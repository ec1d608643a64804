"""FoPru: focal pruning by vision-encoder attention, rank or row strategy (arXiv 2411.14164).

Paper: token significance from the vision encoder's attention; `rank` keeps the global top-k,
`row` keeps whole rows of the patch grid with the highest aggregated significance (continuous local
context); kept tokens return to their original order. No official code was found and the exact
significance formula is unclear in the sources reached; prunec uses the attention each patch
receives (mean over heads and every query) at the scoring layer (the vision feature layer before
a VLM's LLM). Row strategy: rows ranked by their summed significance are kept whole while they fit;
a budget that is not a multiple of the grid width fills the remainder from the next row by token
significance (the paper does not say).
"""
from __future__ import annotations

import math

import torch

from . import MethodInfo, register_method
from .lowerings import select_by_attention
from .hiprune import received_attention


def fopru_keep(qs, ks, masks, scales, is_causal, n_candidates: int, n_keep: int, strategy: str = "rank") -> torch.Tensor:
    """[B, n_keep] sorted indices into the last n_candidates keys (patches, raster order)."""
    score = received_attention(qs[0], ks[0], masks[0], scales[0], is_causal)[:, -n_candidates:]
    if strategy == "rank":
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        return order[:, :n_keep].sort(dim=1).values
    width = math.isqrt(n_candidates)
    if width * width != n_candidates:
        raise ValueError(f"fopru row strategy needs a square patch grid, got {n_candidates} candidates")
    grid = score.view(score.shape[0], width, width)
    row_order = torch.sort(grid.sum(dim=2), dim=1, descending=True, stable=True).indices  # [B, width]
    full, extra = divmod(n_keep, width)
    rows = []
    for b in range(score.shape[0]):
        kept = [r * width + c for r in row_order[b, :full].tolist() for c in range(width)]
        if extra:
            r = int(row_order[b, full])
            cols = torch.sort(grid[b, r], descending=True, stable=True).indices[:extra].tolist()
            kept += [r * width + c for c in cols]
        rows.append(sorted(kept))
    return torch.tensor(rows, dtype=torch.long, device=score.device)


register_method(MethodInfo(
    name="fopru",
    lower_select=select_by_attention,
    action="prune",
    kind="select",
    signals=("layer_attention",),
    fn=fopru_keep,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"strategy": {"enum": ["rank", "row"], "description": "global top-k, or whole grid rows"}},
    },
    defaults={"strategy": "rank"},
    default_positions="renumber",
    domains=("llm", "vision"),
    layer_domains=("vision",),  # a patch grid: not text
    summary="vision attention received; global top-k (rank) or whole patch-grid rows (row)",
    source="FoPru paper (arXiv 2411.14164); no official code found",
    variants={"strategy": "rank / row (both paper)"},
))
