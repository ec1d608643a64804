"""Pool: average (or max) the image's token grid down to the budget, the spatial-downsampling baseline
(UniPruneBench `methods/Pool_PreLLM.py`; VTC-Bench's finding that downsampling beats many methods).

Each image's candidates are laid out as an h x w grid (h = w = sqrt(n) when n is square, else the
largest divisor h <= sqrt(n), UniPruneBench's rule) and pooled to an r x c grid with PyTorch's exact
adaptive-pool bins: output row i covers input rows [floor(i h / r), ceil((i + 1) h / r)), likewise
for columns. r x c = the budget per image: the square side when the budget is a square (64 = 8 x 8),
else the factor pair closest to the image's aspect ratio (128 of 24 x 24 -> 8 x 16), or `grid:` as
written. A pooled token takes the sequence slot of its bin's top-left token, so the pooled grid stays
in row-major order, and the LLM sees a shorter sequence (positions renumbered).
"""
from __future__ import annotations

import json
import math
from fractions import Fraction

import torch

from .. import ops
from ..candidates import candidate_positions, candidate_rows, keep_indices, keep_shape, merged_back
from ..lowering import Selection
from . import MethodInfo, register_method


def image_grid(n: int) -> tuple[int, int]:
    """(h, w) of n tokens: the largest divisor h <= sqrt(n)."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def output_grid(n_keep: int, grid: tuple[int, int], written: list[int] | None = None) -> tuple[int, int] | None:
    """(rows, cols) of the pooled grid, or None when no factor pair of n_keep fits inside `grid`."""
    h, w = grid
    if written:
        return tuple(written) if written[0] * written[1] == n_keep and written[0] <= h and written[1] <= w else None
    pairs = [(r, n_keep // r) for r in range(1, n_keep + 1) if n_keep % r == 0 and r <= h and n_keep // r <= w]
    if not pairs:
        return None
    # aspect mismatch as an exact ratio >= 1 (ties, e.g. 8 x 12 and 12 x 8 of a square, go to fewer rows)
    return min(pairs, key=lambda p: (max(Fraction(p[0] * w, p[1] * h), Fraction(p[1] * h, p[0] * w)), p[0]))


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_grid(features: torch.Tensor, n_keep: int, grid: list[int] | None = None, mode: str = "avg"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N, D] one image's tokens -> ([B, n_keep] sorted slots: each bin's top-left token, [B, n_keep, D]
    pooled values)."""
    h, w = image_grid(features.shape[1])
    rows, cols = output_grid(n_keep, (h, w), grid)
    x = features.float().transpose(1, 2).reshape(features.shape[0], -1, h, w)
    pooled = (torch.nn.functional.adaptive_avg_pool2d if mode == "avg" else
              torch.nn.functional.adaptive_max_pool2d)(x, (rows, cols))
    slots = torch.tensor([r0 * w + c0 for r0, _ in _bins(h, rows) for c0, _ in _bins(w, cols)],
                         device=features.device)
    return slots.expand(features.shape[0], -1), pooled.flatten(2).transpose(1, 2).to(features.dtype)


@torch.library.custom_op("prunec::pool_candidates", mutates_args=())
def pool_candidates(params: str, hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int,
                    images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's candidates pooled to its share of the budget: (sorted keep indices over the sequence,
    hidden states with each kept slot holding its pooled value)."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    per, keep = n_candidates // images, n_keep // images
    slots, values = [], []
    for m in range(images):
        slot, value = pool_grid(features[:, m * per:(m + 1) * per], keep, **json.loads(params))
        slots.append(slot + m * per)
        values.append(value)
    local = torch.cat(slots, dim=1)
    return keep_indices(candidates, positions, local), merged_back(hidden, positions, local, torch.cat(values, dim=1))


@pool_candidates.register_fake
def _(params, hidden, candidates, n_candidates, n_keep, images):
    return keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape)


ops.keep_index_op("pool_candidates")


def _lower_select(b) -> Selection:
    import operator

    merge = b.add("select", torch.ops.prunec.pool_candidates.default,
                  (json.dumps(b.stage.param_dict, sort_keys=True), b.signal("hidden"), b.candidates, *b.sizes,
                   b.images_per_row))
    index = b.add("select", operator.getitem, (merge, 0))
    source = b.add("select", operator.getitem, (merge, 1), meta_from=b.record.site_value)
    return Selection(index, source)


def _check_budget(params, available, n_keep, adapter, protect, images):
    grid = image_grid(available // images)
    if output_grid(n_keep // images, grid, params.get("grid")) is None:
        written = params.get("grid")
        what = f"grid {written[0]} x {written[1]}" if written else f"no rows x cols grid of {n_keep // images} tokens"
        return (f"pool keeps {n_keep // images} tokens per image of a {grid[0]} x {grid[1]} grid, and {what} fits "
                "(rows <= grid rows, cols <= grid cols, rows x cols = the budget)", "keep")
    return None


register_method(MethodInfo(
    name="pool",
    action="merge",
    kind="merge",
    signals=("hidden",),
    fn=pool_grid,
    lower_select=_lower_select,
    check_budget=_check_budget,
    per_image=True,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "grid": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2,
                     "description": "pooled rows x cols per image (their product = the budget per image); "
                                    "default: the factor pair closest to the image's aspect"},
            "mode": {"enum": ["avg", "max"], "description": "adaptive average (default) or max pooling"},
        },
    },
    defaults={"mode": "avg"},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="adaptive average (or max) pooling of each image's token grid to the budget (exact PyTorch bins)",
    source="UniPruneBench methods/Pool_PreLLM.py (pool_pre_llm); VTC-Bench image downsampling",
    variants={"mode": "avg (UniPruneBench default) / max (POOLING_MODE=max)"},
))
