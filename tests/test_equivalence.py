"""Emitted modules against independent references.

- Keep-everything: every family's emitted module equals the original HF model (1e-5, fp32), both
  with an empty pipeline and with stages that keep every token (which exercises the full rewrite).
- FastV and DivPrune: emitted modules equal the HF model run with forward hooks doing the same
  selection (tests/reference.py), at batch 1 and at batch 3 with left padding and different prompt
  lengths.
"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_on_kept_real_tokens, assert_close_on_real_tokens, llama_inputs, llava_inputs
from reference import HookReference, VisionReference, reference_stages

from prunec.models import load_model

ATOL = 1e-5


def _hf(plan):
    return load_model(plan.lock["model"], plan.spec.base_dir)


# --------------------------------------------------------------------------- keep everything

TEXT_FAMILIES = {"tiny-llama": lambda m, ids, mask: m(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                 "tiny-bert": lambda m, ids, mask: m(input_ids=ids, attention_mask=mask).last_hidden_state}
# builtin -> passes interpolate_pos_encoding. All three take another embedding branch at their native
# size and export guards on it, so a capture holds at its captured image size (checked at run time).
VISION_FAMILIES = {"tiny-vit": True, "tiny-clip-vision": True, "tiny-dinov2": False}


@pytest.mark.parametrize("builtin", sorted(TEXT_FAMILIES))
def test_keep_everything_text_families(build, builtin):
    plan, module, _ = build(f"""
        prunec: 1
        name: keep-{builtin}
        model: {{builtin: {builtin}}}
        inputs: {{batch: 2, seq_len: 12}}
        pipeline: []
    """)
    hf = _hf(plan)
    gen = torch.Generator().manual_seed(3)
    for batch, seq, pads in [(1, 9, [0]), (3, 17, [0, 4, 7])]:
        ids = torch.randint(3, 100, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        for b, pad in enumerate(pads):
            mask[b, :pad] = 0
        with torch.no_grad():
            expected = TEXT_FAMILIES[builtin](hf, ids, mask)
            actual = module(ids, mask)
        assert_close_on_real_tokens(actual, expected, pads, ATOL)


@pytest.mark.parametrize("builtin", sorted(VISION_FAMILIES))
def test_keep_everything_vision_families(build, builtin):
    plan, module, _ = build(f"""
        prunec: 1
        name: keep-{builtin}
        model: {{builtin: {builtin}}}
        inputs: {{batch: 2}}
        pipeline: []
    """)
    hf = _hf(plan)
    extra = {"interpolate_pos_encoding": True} if VISION_FAMILIES[builtin] else {}
    for batch, size in [(1, 28), (3, 28)]:
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(module(pixels), hf(pixel_values=pixels, **extra).last_hidden_state,
                                       atol=ATOL, rtol=0)


LLAVA_KEEP_ALL = """
    prunec: 1
    name: llava-keep-all-{name}
    model: {{builtin: tiny-llava}}
    inputs: {{batch: 2, seq_len: 30}}
    pipeline: {pipeline}
"""


@pytest.mark.parametrize("name,pipeline", [
    ("empty", "[]"),
    ("stages", "[{site: projector.output, method: divprune, keep: {ratio: 1.0}},"
               " {site: 'llm.layers[0, 2]', method: fastv, keep: {ratio: 1.0}}]"),
])
def test_keep_everything_llava(build, name, pipeline):
    plan, module, _ = build(LLAVA_KEEP_ALL.format(name=name, pipeline=pipeline))
    hf = _hf(plan)
    for pads in ([0], [0, 3, 6]):
        ids, mask, pixels = llava_inputs(hf.config, pads, seq_len=30, seed=len(pads))
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
            assert_close_on_real_tokens(module(ids, mask, pixels), expected, pads, ATOL)


def test_keep_everything_vision_stage(build):
    plan, module, _ = build("""
        prunec: 1
        name: vit-keep-all-stage
        model: {builtin: tiny-vit}
        inputs: {batch: 2}
        pipeline:
          - {site: "vision.layers[1]", method: divprune, keep: {ratio: 1.0}}
    """)
    hf = _hf(plan)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(module(pixels), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- pruning vs hooks

LLAVA_SPECS = {
    "fastv": """
        prunec: 1
        name: fastv-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[1]", method: fastv, keep: {ratio: 0.25}}
    """,
    "fastv-all-renumber": """
        prunec: 1
        name: fastv-all-renumber
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[0]", method: fastv, params: {query: all}, keep: {count: 6}, positions: renumber}
    """,
    "fastv-last-useful-layer": """
        prunec: 1
        name: fastv-last-useful-layer
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[2]", method: fastv, keep: {count: 5}}
    """,
    "keep-original-then-renumber": """
        prunec: 1
        name: keep-then-renumber
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[0]", method: fastv, keep: {count: 10}, positions: keep_original}
          - {site: "llm.layers[2]", method: fastv, keep: {count: 4}, positions: renumber}
    """,
    "renumber-then-keep-original": """
        prunec: 1
        name: renumber-then-keep
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[0]", method: fastv, keep: {count: 10}, positions: renumber}
          - {site: "llm.layers[2]", method: fastv, keep: {count: 4}, positions: keep_original}
    """,
    "pyramiddrop": """
        prunec: 1
        name: pyramiddrop-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[0, 1, 2]", method: pyramiddrop, keep: {ratio: [0.5, 0.25, 0.125]}}
    """,
    "pyramiddrop-keep-original+fastv": """
        prunec: 1
        name: pyramiddrop-mixed
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[0]", method: fastv, keep: {count: 12}, positions: renumber}
          - {site: "llm.layers[1]", method: pyramiddrop, keep: {count: 6}, positions: keep_original}
    """,
    "divprune": """
        prunec: 1
        name: divprune-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: projector.output, method: divprune, keep: {ratio: 0.375}}
    """,
    "random-in-llm+fastv": """
        prunec: 1
        name: random-in-llm-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[0]", method: random, params: {seed: 11}, keep: {count: 10}, positions: keep_original}
          - {site: "llm.layers[2]", method: fastv, keep: {count: 4}}
    """,
    "dart": """
        prunec: 1
        name: dart-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: "llm.layers[1]", method: dart, params: {pivots_image: 2, pivots_text: 3}, keep: {count: 11}}
    """,
    "divprune+fastv x2": """
        prunec: 1
        name: combined-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: projector.output, method: divprune, keep: {ratio: 0.75}}
          - {site: "llm.layers[1, 2]", method: fastv, keep: {count: [8, 3]}}
    """,
}


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
@pytest.mark.parametrize("spec", sorted(LLAVA_SPECS))
def test_llava_pruning_matches_hook_reference(build, spec, pads):
    plan, module, _ = build(LLAVA_SPECS[spec])
    reference = HookReference(_hf(plan), reference_stages(plan))
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=30, seed=7 + len(pads))
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    expected = reference(ids, mask, pixels)
    dropped = sum(s.n_candidates - s.n_keep for s in plan.stages)
    assert actual.shape[1] == ids.shape[1] - dropped
    assert_close_on_real_tokens(actual, expected, pads, ATOL)


def test_llava_reference_comparison_can_fail(build, monkeypatch):
    """Guards the test above against a vacuous pass: a reference that keeps the *lowest*-scoring
    image tokens must disagree with the emitted module."""
    import reference as ref

    plan, module, _ = build(LLAVA_SPECS["fastv"])
    monkeypatch.setattr(ref, "slow_topk", lambda scores, k: sorted(
        sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k]))
    wrong = HookReference(_hf(plan), reference_stages(plan))
    pads = [0, 2, 5]
    ids, mask, pixels = llava_inputs(wrong.model.config, pads, seq_len=30, seed=9)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    with pytest.raises(AssertionError):
        assert_close_on_real_tokens(actual, wrong(ids, mask, pixels), pads, ATOL)


@pytest.mark.parametrize("site,layer", [("vision.layers[1]", 1), ("vision.output", None)])
@pytest.mark.parametrize("builtin", ["tiny-vit", "tiny-clip-vision", "tiny-dinov2"])
def test_vision_divprune_matches_hook_reference(build, builtin, site, layer):
    plan, module, _ = build(f"""
        prunec: 1
        name: {builtin}-divprune-{layer}
        model: {{builtin: {builtin}}}
        inputs: {{batch: 2}}
        pipeline:
          - {{site: "{site}", method: divprune, keep: {{count: 5}}}}
    """)
    hf = _hf(plan)
    layers = dict(hf.named_modules())[plan.adapter.domains()["vision"].layers_path.removeprefix("hf.")]
    reference = VisionReference(hf, layers, layer, 5, plan.adapter.leading_tokens(),
                                interpolate=builtin != "tiny-dinov2")
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(module(pixels), reference(pixels), atol=ATOL, rtol=0)


@pytest.mark.parametrize("source", ["path", "config"])
def test_models_from_a_local_directory_or_config_file(tmp_path, source):
    """`model.path` loads with from_pretrained (local files only); `model.config` builds seeded
    random weights from a config file. Both capture and reproduce the model they name."""
    import prunec

    seeded = load_model({"builtin": "tiny-llama", "seed": 5}, tmp_path)
    seeded.save_pretrained(tmp_path / "weights")
    key, value = ("path", "weights") if source == "path" else ("config", "weights/config.json")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"prunec: 1\nname: local-{source}\nmodel: {{{key}: {value}, seed: 5}}\n"
                    "inputs: {batch: 2, seq_len: 10}\npipeline: []\n")
    module = prunec.load(prunec.build(spec, tmp_path / "out"))
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = seeded(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(module(ids, mask), expected, atol=ATOL, rtol=0)


def test_emitted_module_runs_under_torch_compile(build):
    """The prunec ops carry fake kernels, so dynamo traces the whole pruned program."""
    plan, module, _ = build(LLAVA_SPECS["divprune+fastv x2"])
    ids, mask, pixels = llava_inputs(plan.adapter.config, [0, 2, 5], seq_len=30, seed=11)
    compiled = torch.compile(module, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, mask, pixels), module(ids, mask, pixels), atol=ATOL, rtol=0)


def test_last_logits_output_is_the_last_row_of_the_reference(build):
    plan, module, _ = build(LLAVA_SPECS["pyramiddrop"].replace("pipeline:", "output: {logits: last}\n        pipeline:"))
    reference = HookReference(_hf(plan), reference_stages(plan))
    ids, mask, pixels = llava_inputs(reference.model.config, [0, 2, 5], seq_len=30, seed=21)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    expected = reference(ids, mask, pixels)
    assert actual.shape == (3, 1, expected.shape[-1])
    torch.testing.assert_close(actual, expected[:, -1:], atol=ATOL, rtol=0)


LLAMA_PIPELINES = {
    "fastv": "[{site: 'llm.layers[1]', method: fastv, keep: {count: 6}}]",
    "fastv-all-renumber": "[{site: 'llm.layers[0]', method: fastv, params: {query: all}, keep: {count: 9},"
                          " positions: renumber}]",
    "pyramiddrop-3-stages": "[{site: 'llm.layers[0, 1, 2]', method: pyramiddrop, keep: {ratio: [0.5, 0.3, 0.2]}}]",  # 13 x: 6, 3, 2 (int())
}


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
@pytest.mark.parametrize("name", sorted(LLAMA_PIPELINES))
def test_llama_text_pruning_matches_hook_reference(build, name, pads):
    """Text-token pruning: every token but the last is a candidate (left padding included)."""
    plan, module, _ = build(f"""
        prunec: 1
        name: llama-{name}
        model: {{builtin: tiny-llama}}
        inputs: {{batch: 2, seq_len: 14}}
        pipeline: {LLAMA_PIPELINES[name]}
    """)
    reference = HookReference(_hf(plan), reference_stages(plan))
    ids, mask = llama_inputs(pads, 14, seed=9)
    with torch.no_grad():
        actual = module(ids, mask)
    expected = reference(ids, mask)
    assert actual.shape[1] == 14 - sum(s.n_candidates - s.n_keep for s in plan.stages)
    assert_close_on_kept_real_tokens(actual, expected, mask, reference.final_tokens, ATOL)


def test_fastv_last_query_respects_the_padding_mask(build, monkeypatch):
    """A long-padded row where the head-mean attention of the last token, taken without the padding
    mask, keeps other image tokens: the module equals the masked reference, and the same module with
    its scoring made to ignore the mask (the mutation) does not."""
    import prunec.ops

    plan, module, _ = build(LLAVA_SPECS["fastv"])
    reference = HookReference(_hf(plan), reference_stages(plan))
    unmasked = prunec.ops._attention_received
    for seed in range(20):  # seed 10 is the first such input here
        pads = [0, 20, 4]
        ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=50, seed=seed)
        with torch.no_grad():
            expected = reference(ids, mask, pixels)
            actual = module(ids, mask, pixels)
            assert_close_on_real_tokens(actual, expected, pads, ATOL)
            monkeypatch.setattr(prunec.ops, "_attention_received",
                                lambda q, k, m, scale, causal, query: unmasked(q, k, None, scale, causal, query))
            ignoring = module(ids, mask, pixels)
            monkeypatch.setattr(prunec.ops, "_attention_received", unmasked)
        try:
            assert_close_on_real_tokens(ignoring, expected, pads, ATOL)
        except AssertionError:
            return  # this input tells the two apart, and the module sided with the mask
    pytest.fail("no input of 20 seeds where ignoring the padding mask changes FastV's selection")
