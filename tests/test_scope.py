"""`scope: per_image`: a stage selects within each image of a multi-image row, each image keeping its share.

The references select per image from the definitions (tests/reference.py `per_image_pick`); counts are
written out by hand from the rule (a ratio applies to each image's own tokens).
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_on_real_tokens, llava_inputs
from reference import HookReference, reference_stages

import prunec
from prunec.methods import catalog
from prunec.models import load_model


def _spec(tmp_path, stage: str, images: int = 3, seq_len: int = 72):
    path = tmp_path / "scope.yaml"
    path.write_text(f"prunec: 1\nname: scope\nmodel: {{builtin: tiny-llava}}\n"
                    f"inputs: {{batch: 1, seq_len: {seq_len}, images: {images}}}\npipeline:\n  - {stage}\n")
    return path


@pytest.mark.parametrize("stage,expected", [
    # 16 tokens per image: 0.3 x 16 = 4.8 -> 5 per image (half-even), 15 in all (the whole row's 0.3 x 48 = 14.4 -> 14)
    ("{site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.3}, scope: per_image}", 15),
    ("{site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.3}}", 14),
    # a count is the row's total, split equally
    ("{site: projector.output, method: divprune, keep: {count: 12}, scope: per_image}", 12),
])
def test_a_ratio_applies_to_each_image(tmp_path, stage, expected):
    from prunec.explain import stage_table

    plan = prunec.plan(_spec(tmp_path, stage))
    assert plan.stages[0].n_keep == expected
    assert ("(per image)" in stage_table(plan)) == ("per_image" in stage)


@pytest.mark.parametrize("stage,message", [
    ("{site: 'llm.layers[1]', method: dart, keep: {count: 12}, scope: per_image}",
     r"scope\.yaml:6:69: error at /pipeline/0/scope: method dart selects over its whole candidate set \(it has no "
     r"per-image selection\); scope: per_image is not available for it"),
    ("{site: projector.output, method: pool, keep: {count: 12}, scope: all}",
     r"error at /pipeline/0/scope: method pool selects within each image; scope: all is not available for it"),
    ("{site: projector.output, method: divprune, keep: {count: 10}, scope: per_image}",
     r"error at /pipeline/0/keep/count: a `scope: per_image` stage of divprune keeps the same count in each of "
     r"the 3 images; 10 is not a multiple"),
])
def test_scope_errors_name_the_entry(tmp_path, stage, message):
    with pytest.raises(prunec.errors.SpecError, match=message):
        prunec.plan(_spec(tmp_path, stage))


def test_a_per_image_stage_after_a_global_one_is_refused(tmp_path):
    path = tmp_path / "scope.yaml"
    path.write_text("prunec: 1\nname: scope\nmodel: {builtin: tiny-llava}\ninputs: {batch: 1, seq_len: 72, images: 3}\n"
                    "pipeline:\n  - {site: projector.output, method: divprune, keep: {count: 30}}\n"
                    "  - {site: 'llm.layers[1]', method: fastv, keep: {count: 12}, scope: per_image}\n")
    with pytest.raises(prunec.errors.SpecError, match="/pipeline/1/method: a `scope: per_image` stage of fastv selects "
                                                      "within each image, and an earlier stage left the images with "
                                                      "different token counts"):
        prunec.plan(path)


def test_methods_list_their_scopes():
    scopes = {row["method"]: row["scopes"] for row in catalog()}
    assert scopes["fastv"] == ["all", "per_image"]       # generic top-k
    assert scopes["divprune"] == ["all", "per_image"]    # its own selection, declared
    assert scopes["pool"] == ["per_image"]
    assert scopes["dart"] == ["all"]


def test_the_lock_and_manifest_record_the_scope(build):
    plan, _, artifact = build("""
        prunec: 1
        name: scope-lock
        model: {builtin: tiny-llava}
        inputs: {batch: 1, seq_len: 50, images: 2}
        pipeline:
          - {site: 'llm.layers[1]', method: fastv, keep: {count: 8}, scope: per_image}
    """)
    import json

    assert plan.lock["pipeline"][0]["scope"] == "per_image"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["stages"][0]["scope"] == "per_image"


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
@pytest.mark.parametrize("stages", [
    "- {site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.3}, scope: per_image}",
    "- {site: projector.output, method: divprune, keep: {count: 12}, scope: per_image}\n"
    "          - {site: 'llm.layers[1]', method: fastv, keep: {count: 6}, scope: per_image}",
], ids=["fastv", "divprune+fastv"])
def test_per_image_stages_match_hook_reference(build, pads, stages):
    """Three images per row: each image keeps its own top tokens (FastV) or its own diverse subset
    (DivPrune), as the reference selects within each image from the definitions."""
    plan, module, _ = build(f"""
        prunec: 1
        name: scope-equivalence
        model: {{builtin: tiny-llava}}
        inputs: {{batch: 2, seq_len: 72, images: 3}}
        pipeline:
          {stages}
    """)
    reference = HookReference(load_model(plan.lock["model"], plan.spec.base_dir), reference_stages(plan))
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=72, seed=11 + len(pads), images=3)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    assert_close_on_real_tokens(actual, reference(ids, mask, pixels), pads, 1e-5)
