"""Layer-averaged budgets: the "keep 192" of in-LLM papers (SparseVLM, PyramidDrop) as an input.

`budget: {layer_average: N}` takes the stages' written budgets as the schedule's *shape* and scales
every one of them by a single factor so that the candidate tokens per layer, averaged over the
pruned domain's layers, come as close to N as whole-token counts allow (ties: the smaller budget).
Stages that drop every candidate stay so; no stage keeps more than reaches it, or fewer than one.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .schedule import scaled_counts
from .spec import Stage


def scaled(stages: tuple[Stage, ...], factor: float) -> tuple[Stage, ...]:
    """Every stage's count x factor (`schedule.scaled_counts`), chained so each fits what reaches it."""
    if not stages:
        return ()
    counts = scaled_counts([s.n_keep for s in stages], stages[0].n_candidates, factor)
    reaching = [stages[0].n_candidates] + counts[:-1]
    return tuple(replace(stage, keep_spec=("count", count), n_candidates=available, n_keep=count)
                 for stage, count, available in zip(stages, counts, reaching))


def _top(stages: tuple[Stage, ...]) -> float:
    """A factor at which every stage keeps all that reaches it."""
    return max(stages[0].n_candidates / s.n_keep for s in stages if s.n_keep) + 1.0


def achievable(stages: tuple[Stage, ...], average: Callable[[tuple[Stage, ...]], float]) -> tuple[float, float]:
    """The lowest and highest layer averages any factor gives."""
    return average(scaled(stages, 0.0)), average(scaled(stages, _top(stages)))


def fit_layer_average(stages: tuple[Stage, ...], target: float,
                      average: Callable[[tuple[Stage, ...]], float]) -> tuple[Stage, ...]:
    """The stages scaled to the achievable layer average nearest `target` (within `achievable`).
    `average` maps stages to their layer average and grows with the factor, so a bisection finds
    the step where it crosses the target; the nearer of the two sides wins."""
    lo, hi = 0.0, _top(stages)  # average(lo) < target <= average(hi), unless lo already meets it
    if average(scaled(stages, lo)) >= target:
        hi = lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if average(scaled(stages, mid)) >= target:
            hi = mid
        else:
            lo = mid
    return min((scaled(stages, lo), scaled(stages, hi)), key=lambda s: (abs(average(s) - target), average(s)))
