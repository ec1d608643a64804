"""FLOPs accounting against published figures and against torch's own FLOP counter.

Published (METHODS.md 0.4): TransPrune-High's schedule is 40.8% of the TFLOPs under image-only
accounting with 3ndm; FastV K=3, R=50% is "FLOPs = 57%" (57.9% under full-sequence accounting with
~20 text tokens, FastV's 2ndm). Both on LLaVA-1.5-7B's shape (32 layers, d 4096, m 11008, 576 image
tokens after a ~35-token system prompt), planned from a config file without weights.

Exact counts are checked against `torch.utils.flop_counter.FlopCounterMode` running the HF model
under eager attention (so QK^T and AV are counted as matmuls), with and without hook-based pruning.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import llava_inputs, write_spec
from reference import HookReference, reference_stages

import prunec
from prunec.flops import estimate
from prunec.models import load_model

LLAVA_15_7B = {
    "model_type": "llava", "image_token_id": 32000, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096},
}
SYSTEM_TOKENS = 35


def _plan(tmp_path, pipeline: str, seq_len: int):
    (tmp_path / "llava15.json").write_text(json.dumps(LLAVA_15_7B))
    spec = write_spec(tmp_path, f"""
        prunec: 1
        name: flops
        model: {{config: llava15.json}}
        inputs: {{batch: 1, seq_len: {seq_len}}}
        pipeline: {pipeline}
    """)
    return prunec.plan(spec)


def _view(flops, tokens, ffn):
    return next(v for v in flops["paper_style"] if v["tokens"] == tokens and v["ffn"] == ffn)


def test_transprune_high_schedule_is_40_8_percent_image_only_3ndm(tmp_path):
    # TransPrune prunes after layers 7/9/12 (1-indexed) keeping 0.875/0.625/0.125 of 576; the method
    # does not change the count, so FastV stands in for it here.
    plan = _plan(tmp_path, "[{site: 'llm.layers[6, 8, 11]', method: fastv, keep: {ratio: [0.875, 0.625, 0.125]}}]",
                 seq_len=SYSTEM_TOKENS + 576 + 40)
    assert [s.n_keep for s in plan.stages] == [504, 360, 72]
    flops = estimate(plan)
    assert round(_view(flops, "image", "3ndm")["ratio"] * 100, 1) == 40.8
    # the same schedule is 46-49% under full-sequence accounting (METHODS.md): conventions matter
    assert 0.46 <= _view(flops, "full", "3ndm")["ratio"] <= 0.49


def test_fastv_k3_r50_is_about_57_percent_full_sequence(tmp_path):
    plan = _plan(tmp_path, "[{site: 'llm.layers[2]', method: fastv, keep: {ratio: 0.5}}]",
                 seq_len=SYSTEM_TOKENS + 576 + 20)
    flops = estimate(plan)
    assert round(_view(flops, "full", "2ndm")["ratio"] * 100, 1) == 57.9
    assert flops["convention"].endswith("3ndm") and "full sequence" in flops["convention"]


def test_layer_averaged_budget_matches_sparsevlm_192(tmp_path):
    """SparseVLM's `score.py` comment for its 192 budget: 2x576, 4x300, 10x200, 16x110 over 32 layers,
    i.e. cuts after 0-indexed layers 1, 5 and 15 keeping 300, 200 and 110."""
    plan = _plan(tmp_path, "[{site: 'llm.layers[1, 5, 15]', method: fastv, keep: {count: [300, 200, 110]}}]",
                 seq_len=SYSTEM_TOKENS + 576 + 40)
    assert estimate(plan)["layer_average_candidates"] == {"llm": (2 * 576 + 4 * 300 + 10 * 200 + 16 * 110) / 32}
    assert estimate(plan)["layer_average_candidates"]["llm"] == 191.0
    from prunec.explain import stage_table

    assert "averaged over the layers (the layer-averaged budget in-LLM papers report): llm 191;" in stage_table(plan)


def _layer_flops(counter: FlopCounterMode) -> int:
    """FLOPs torch counted inside the decoder layers, the vision encoder's layers and the projector
    (not the patch-embedding conv, the embeddings or the LM head)."""
    total = 0
    for module, ops in counter.get_flop_counts().items():
        if re.search(r"\.language_model\.layers\.\d+$|\.vision_tower\.encoder$|\.multi_modal_projector$", module):
            total += sum(ops.values())
    return total


PIPELINES = {
    "unpruned": "[]",
    "divprune+fastv": "[{site: projector.output, method: divprune, keep: {count: 10}},"
                      " {site: 'llm.layers[1]', method: fastv, keep: {count: 4}}]",
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_exact_prefill_flops_equal_torch_flop_counter(tmp_path, name):
    spec = write_spec(tmp_path, f"""
        prunec: 1
        name: exact
        model: {{builtin: tiny-llava}}
        inputs: {{batch: 1, seq_len: 30}}
        pipeline: {PIPELINES[name]}
    """)
    plan = prunec.plan(spec)
    model = load_model(plan.lock["model"], plan.spec.base_dir)
    ids, mask, pixels = llava_inputs(model.config, [0], seq_len=30)
    stages = reference_stages(plan)
    reference = HookReference(model, stages)  # switches the model to eager attention
    counter = FlopCounterMode(display=False)
    with counter:
        reference(ids, mask, pixels)
    assert estimate(plan)["exact"]["prefill_flops"]["pruned"] == _layer_flops(counter)


def test_exact_decode_flops_equal_torch_flop_counter(tmp_path):
    """Unpruned decode: R steps of one token each, attending to the prompt and the tokens so far."""
    new_tokens = 5
    spec = write_spec(tmp_path, """
        prunec: 1
        name: decode
        model: {builtin: tiny-llama, attn_implementation: eager}
        inputs: {batch: 1, seq_len: 12}
        pipeline: []
    """)
    plan = prunec.plan(spec)
    model = load_model(plan.lock["model"], plan.spec.base_dir)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = model(input_ids=ids, use_cache=True)
    cache, token = prefill.past_key_values, prefill.logits[:, -1:].argmax(-1)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for _ in range(new_tokens):
            step = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
    counted = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items()
                  if re.search(r"\.layers\.\d+$", module))
    assert estimate(plan, new_tokens=new_tokens)["exact"]["decode"]["baseline"] == counted
