"""Layer-averaged budgets (`budget: {layer_average: N}`): the written budgets are the schedule's
shape, one factor scales them, and the layer average lands as near N as whole counts allow."""
from __future__ import annotations

import math

import pytest
import yaml
from typer.testing import CliRunner

import prunec
from conftest import write_spec
from prunec.cli import app

# tiny-llava: 16 image tokens, a 4-layer LLM; PyramidDrop-shaped schedule 8 -> 4 -> 2 after layers 0, 1, 2
SHAPE, IMAGE_TOKENS, LLM_LAYERS = (8, 4, 2), 16, 4


def _spec(tmp_path, budget: str, pipeline: str | None = None):
    pipeline = pipeline if pipeline is not None else ("  - {site: 'llm.layers[0, 1, 2]', method: pyramiddrop, keep: {count: [8, 4, 2]}}\n")
    return write_spec(tmp_path, f"prunec: 1\nname: avg\nmodel: {{builtin: tiny-llava}}\ninputs: {{batch: 2, seq_len: 40}}\n"
                                f"{budget}pipeline:\n{pipeline}")


def _average(counts) -> float:
    """Image tokens each LLM layer sees, averaged: layer 0 sees all, layer i + 1 what stage i kept."""
    return (IMAGE_TOKENS + sum(counts)) / LLM_LAYERS


def _scaled(factor: float) -> list[int]:
    out, reaching = [], IMAGE_TOKENS
    for base in SHAPE:
        reaching = max(1, min(reaching, math.floor(base * factor + 0.5)))
        out.append(reaching)
    return out


@pytest.mark.parametrize("target", [5.0, 6.0, 7.5, 9.3, 12.0])
def test_layer_average_is_the_nearest_any_single_factor_reaches(tmp_path, target):
    plan = prunec.plan(_spec(tmp_path, f"budget: {{layer_average: {target}}}\n"))
    counts = [s.n_keep for s in plan.stages]
    best = min(abs(_average(_scaled(i / 2000)) - target) for i in range(0, 2 * 2000 * 3))  # factors 0 .. 6
    assert abs(_average(counts) - target) == pytest.approx(best)
    assert counts == sorted(counts, reverse=True) and counts[-1] >= 1
    assert [s.keep_spec for s in plan.stages] == [("count", c) for c in counts]


def test_the_lock_records_counts_and_rebuilds_the_same_stages(tmp_path):
    plan = prunec.plan(_spec(tmp_path, "budget: {layer_average: 6}\n"))
    assert "budget" not in plan.lock
    lock = write_spec(tmp_path, yaml.safe_dump(plan.lock, sort_keys=False), name="spec.lock.yaml")
    again = prunec.plan(lock)
    assert [(s.site, s.n_keep) for s in again.stages] == [(s.site, s.n_keep) for s in plan.stages]
    assert _average([s.n_keep for s in plan.stages]) == 6.0  # 16 + 5 + 2 + 1 over 4 layers: exactly reachable


@pytest.mark.parametrize("budget, pipeline, expected", [
    ("budget: {layer_average: 20}\n", None, "expected a layer average in 4.75..16 (llm candidates per layer"),
    ("budget: {layer_average: 3}\n", "  []\n", "needs stages in exactly one domain; this pipeline prunes nothing"),
    ("budget: {layer_average: 0}\n", None, "error at /budget/layer_average: expected a number > 0, got 0"),
])
def test_unreachable_or_ambiguous_budgets_are_spec_errors(tmp_path, budget, pipeline, expected):
    result = CliRunner().invoke(app, ["validate", str(_spec(tmp_path, budget, pipeline))])
    assert result.exit_code == 2, result.output
    assert ":5:" in result.output and expected in result.output
    assert "Traceback" not in result.output
