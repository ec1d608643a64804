"""`prunec bench` on a tiny model: the report's arithmetic and the eager way's agreement.

No wall-clock assertion: speed is measured in benchmarks/, not here. What is asserted is that the
report is consistent with its own samples and FLOPs, and that the eager-attention way (HF model,
eager attention, hooks) keeps the same tokens as the emitted module, so the speedup compares
like with like.
"""
from __future__ import annotations

import json
import statistics

import pytest
from typer.testing import CliRunner

import prunec
from conftest import write_spec
from prunec.cli import app
from prunec.flops import estimate

PIPELINES = {
    "fastv+pyramiddrop": "[{site: projector.output, method: divprune, keep: {ratio: 0.75}},"
                         " {site: 'llm.layers[0]', method: fastv, keep: {ratio: 0.5}},"
                         " {site: 'llm.layers[1, 2]', method: pyramiddrop, keep: {ratio: [0.25, 0.125]},"
                         " positions: keep_original}]",
    "fastv-late-all-queries": "[{site: 'llm.layers[2]', method: fastv, params: {query: all},"
                                    " keep: {count: 5}, positions: renumber}]",
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_bench_report_is_consistent_and_the_eager_way_keeps_the_same_tokens(tmp_path, name):
    spec = write_spec(tmp_path, f"""
        prunec: 1
        name: bench-test
        model: {{builtin: tiny-llava}}
        inputs: {{batch: 3, seq_len: 40}}
        output: {{logits: last}}
        decode: {{policy: static}}
        pipeline: {PIPELINES[name]}
    """)
    result = CliRunner().invoke(app, ["bench", str(spec), "--rounds", "2", "--warmup", "1", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["median_ms"]) == {"unpruned", "prunec", "eager way"}
    for way, samples in report["samples_ms"].items():
        assert len(samples) == 2 and report["median_ms"][way] == pytest.approx(statistics.median(samples), abs=0.01)
    assert report["speedup"] == pytest.approx(report["median_ms"]["unpruned"] / report["median_ms"]["prunec"], rel=1e-3)
    assert report["ideal_speedup"] == pytest.approx(1 / estimate(prunec.plan(spec))["exact"]["prefill_flops"]["ratio"], rel=1e-3)
    assert report["efficiency"] == pytest.approx(report["speedup"] / report["ideal_speedup"], abs=2e-3)
    assert report["eager_way_max_abs_diff"] < 1e-5
    assert 0 < report["prunec_ops_share"] < 1 and report["threads"] == 1
    assert all(v is None or v > 0 for v in report["peak_activation_bytes"].values())
    generation = report["generation"]
    assert set(generation["ttft_ms"]) == set(generation["decode_tokens_per_s"]) == {"unpruned", "prunec"}
    config = prunec.plan(spec).adapter.config.text_config
    per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # K+V, fp32
    # 16 image tokens: 12 enter the LLM, then 8, 4 and 2 are kept after layers 0, 1, 2; or 5 kept
    # after layer 2 (11 fewer in layer 3's cache)
    dropped_before = {"fastv+pyramiddrop": [4, 8, 12, 14], "fastv-late-all-queries": [0, 0, 0, 11]}[name]
    assert generation["kv_cache_bytes"]["prunec"] == 3 * per_token * sum(40 - d for d in dropped_before)
    assert generation["kv_cache_bytes"]["unpruned"] == 3 * per_token * 40 * 4


def test_bench_says_why_there_is_no_eager_way(tmp_path):
    spec = write_spec(tmp_path, """
        prunec: 1
        name: bench-vit
        model: {builtin: tiny-vit}
        inputs: {batch: 2}
        pipeline:
          - {site: vision.output, method: divprune, keep: {ratio: 0.5}}
    """)
    result = CliRunner().invoke(app, ["bench", str(spec), "--rounds", "1", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    assert "eager-attention way: the eager-attention way is implemented for LLaVA, not vit" in result.output
    assert "speedup" in result.output and "ideal" in result.output
