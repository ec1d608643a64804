"""The front door: `prunec.compile` on a loaded model, budgets relative to the stage, negative layer
indices, and over-budget errors that say what fits. Counts are worked out by hand from the tiny
LLaVA (16 image tokens per row) and each method's rounding rule (DivPrune and FastV: half to even)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prunec
from conftest import REPO, llava_inputs, write_spec
from prunec.errors import SpecError
from prunec.models import load_model

TWO_STAGES = """
    prunec: 1
    name: front
    model: {{builtin: tiny-llava}}
    inputs: {{seq_len: 40}}
    pipeline:
      - site: projector.output
        method: divprune
        keep: {{ratio: 0.5}}
      - site: {site}
        method: fastv
        keep: {keep}
"""


def _plan(tmp_path, site="llm.layers[1]", keep="{ratio: 0.5}"):
    return prunec.plan(write_spec(tmp_path, TWO_STAGES.format(site=site, keep=keep)))


@pytest.mark.parametrize("keep, kept", [
    ("{ratio: 0.5}", 8),              # 0.5 x 16 original = 8 (all 8 that reach it)
    ("{ratio: 0.5, of: input}", 8),
    ("{ratio: 0.5, of: stage}", 4),   # 0.5 x 8 reaching = 4
    ("{ratio: 0.3, of: stage}", 2),   # 0.3 x 8 = 2.4 -> 2
    ("{ratio: 0.3125, of: stage}", 2),  # 2.5 -> 2 (FastV rounds half to even)
    ("{ratio: 0.4375, of: stage}", 4),  # 3.5 -> 4
])
def test_ratio_of_stage_counts_from_the_tokens_reaching_it(tmp_path, keep, kept):
    plan = _plan(tmp_path, keep=keep)
    assert [s.n_keep for s in plan.stages] == [8, kept]
    written = plan.lock["pipeline"][1]["keep"]
    assert written.get("of", "input") == ("stage" if "stage" in keep else "input")


def test_lock_with_of_stage_rebuilds_the_same_plan(tmp_path):
    plan = _plan(tmp_path, keep="{ratio: 0.3, of: stage}")
    lock = tmp_path / "again" / "spec.lock.yaml"
    lock.parent.mkdir()
    from prunec.semantics import dump_lock

    lock.write_text(dump_lock(plan.lock))
    assert [s.n_keep for s in prunec.plan(lock).stages] == [8, 2]


def test_negative_layer_indices_count_from_the_end(tmp_path):
    # tiny-llava's LLM has 4 layers: -2 is layer 2, -4 is layer 0
    assert _plan(tmp_path, site="llm.layers[-2]").stages[1].site == "llm.layers[2]"
    assert _plan(tmp_path, site="llm.layers[-4]").stages[1].site == "llm.layers[0]"


@pytest.mark.parametrize("keep, fits", [
    ("{ratio: 0.75}", "at most ratio: 0.5 (of the original 16), or a ratio with `of: stage`"),
    ("{count: 9}", "at most count: 8"),
])
def test_over_budget_error_says_what_fits(tmp_path, keep, fits):
    with pytest.raises(SpecError) as caught:
        _plan(tmp_path, keep=keep)
    assert "only 8 candidates reach llm.layers[1]" in str(caught.value) and fits in str(caught.value)


def test_compile_equals_build_then_load(tmp_path):
    model = load_model({"builtin": "tiny-llava", "seed": 0}, None)
    compiled = prunec.compile(model, str(REPO / "specs" / "fastv.yaml"))
    built = prunec.load(prunec.build(REPO / "specs" / "fastv.yaml", tmp_path))
    ids, mask, pixels = llava_inputs(model.config, [0, 4, 1], 40)
    torch.testing.assert_close(compiled(ids, mask, pixels), built(ids, mask, pixels), rtol=0, atol=1e-6)
    assert compiled(input_ids=ids, attention_mask=mask, pixel_values=pixels).shape[0] == 3


def test_compile_uses_the_given_weights_and_writes_a_runnable_artifact(tmp_path):
    # seed 7, not the spec's: a keep-everything spec must reproduce exactly this model
    model = load_model({"builtin": "tiny-llava", "seed": 7}, None)
    spec = {"prunec": 1, "name": "given", "inputs": {"seq_len": 40}, "pipeline": []}
    module = prunec.compile(model, spec, out_dir=tmp_path)
    ids, mask, pixels = llava_inputs(model.config, [0, 3], 40)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(module(ids, mask, pixels), expected, rtol=1e-5, atol=1e-5)
    run = subprocess.run([sys.executable, "-m", "prunec.cli", "run", str(tmp_path / "given")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "output: (2, 40, 256)" in run.stdout


def test_compile_takes_yaml_text_and_refuses_a_non_model(tmp_path):
    text = TWO_STAGES.format(site="llm.layers[1]", keep="{ratio: 0.25}").replace("\n    ", "\n")
    model = load_model({"builtin": "tiny-llava", "seed": 0}, None)
    module = prunec.compile(model, text)
    ids, mask, pixels = llava_inputs(model.config, [0], 40)
    assert module(ids, mask, pixels).shape == (1, 40 - 8 - 4, 256)  # 16 -> 8 -> 4 image tokens
    with pytest.raises(prunec.PrunecError, match="takes a Hugging Face model"):
        prunec.compile(torch.nn.Linear(2, 2), text)
