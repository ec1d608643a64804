"""Generation with a pruned KV cache against independent references.

- keep-everything: the artifact's greedy tokens equal `model.generate` (HF, greedy) token for token;
- pruned (LLaVA: FastV, a 3-stage PyramidDrop, DivPrune before the LLM then FastV; Llama text
  pruning: FastV and a 3-stage PyramidDrop): they equal the HF model
  with forward hooks doing the same selection at prefill and decoding with HF's own DynamicCache
  (tests/reference.py), at batch 1 and at batch 3 with left padding;
- the manifest's KV-cache size equals the analytic value from the per-layer kept counts, and the
  prefill really returns caches of those lengths.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import llama_inputs, llava_inputs
from reference import HookReference, reference_stages

from prunec.generate import Generator, Sampling
from prunec.models import load_model

NEW_TOKENS = 32
PADS = {"batch1": [0], "batch3-left-padded": [0, 2, 5]}


def _spec(name: str, builtin: str, pipeline: str, seq_len: int = 30) -> str:
    return f"""
        prunec: 1
        name: {name}
        model: {{builtin: {builtin}}}
        inputs: {{batch: 2, seq_len: {seq_len}}}
        output: {{logits: last}}
        decode: {{policy: static}}
        pipeline: {pipeline}
    """


PRUNED = {
    "fastv": "[{site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.25}}]",
    "pyramiddrop-3-stages": "[{site: 'llm.layers[0, 1, 2]', method: pyramiddrop, keep: {ratio: [0.5, 0.25, 0.125]}}]",
    "divprune-fastv-renumber": "[{site: projector.output, method: divprune, keep: {ratio: 0.75}},"
                               " {site: 'llm.layers[1]', method: fastv, keep: {count: 5}, positions: renumber}]",
}


PRUNED_LLAMA = {
    "llama-fastv": "[{site: 'llm.layers[1]', method: fastv, keep: {count: 6}}]",
    "llama-pyramiddrop-3-stages": "[{site: 'llm.layers[0, 1, 2]', method: pyramiddrop,"
                                  " keep: {ratio: [0.5, 0.25, 0.125]}}]",
}


def _hf(plan):
    return load_model(plan.lock["model"], plan.spec.base_dir)


@pytest.mark.parametrize("pads", PADS.values(), ids=PADS.keys())
def test_keep_everything_llava_generates_what_hf_generate_does(build, pads):
    plan, _, artifact = build(_spec("gen-keep-llava", "tiny-llava", "[]"))
    hf = _hf(plan)
    ids, mask, pixels = llava_inputs(hf.config, pads, seq_len=30, seed=11)
    ours, logits = Generator(artifact).generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                                return_logits=True)
    expected = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           output_logits=True, return_dict_in_generate=True)
    _assert_same_generation(ours, logits, expected, ids.shape[1], pads)


@pytest.mark.parametrize("pads", PADS.values(), ids=PADS.keys())
def test_keep_everything_llama_generates_what_hf_generate_does(build, pads):
    plan, _, artifact = build(_spec("gen-keep-llama", "tiny-llama", "[]", seq_len=12))
    hf = _hf(plan)
    ids, mask = llama_inputs(pads, 14, seed=5)
    ours, logits = Generator(artifact).generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                                return_logits=True)
    expected = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           output_logits=True, return_dict_in_generate=True)
    _assert_same_generation(ours, logits, expected, ids.shape[1], pads)


def _assert_same_generation(ours, our_logits, expected, prompt_len, pads):
    """Same tokens; same logits at every step (HF numbers left-padded rows' positions from the first
    real token and prunec from the first pad; RoPE is relative, so real tokens see the same scores)."""
    assert torch.equal(ours, expected.sequences[:, prompt_len:])
    torch.testing.assert_close(our_logits, torch.stack(expected.logits, dim=1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pads", PADS.values(), ids=PADS.keys())
@pytest.mark.parametrize("name", sorted(PRUNED))
def test_pruned_generation_matches_hook_reference_with_its_own_cache(build, name, pads):
    plan, _, artifact = build(_spec(f"gen-{name}", "tiny-llava", PRUNED[name]))
    stages = reference_stages(plan)
    reference = HookReference(_hf(plan), stages)
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=30, seed=13)
    ours, our_logits = Generator(artifact).generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS,
                                                    eos_token_id=None, return_logits=True)
    expected, logits = reference.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS)
    assert torch.equal(ours, expected)
    torch.testing.assert_close(our_logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pads", PADS.values(), ids=PADS.keys())
@pytest.mark.parametrize("name", sorted(PRUNED_LLAMA))
def test_pruned_llama_generation_matches_hook_reference(build, name, pads):
    plan, _, artifact = build(_spec(f"gen-{name}", "tiny-llama", PRUNED_LLAMA[name], seq_len=14))
    stages = reference_stages(plan)
    reference = HookReference(_hf(plan), stages)
    ids, mask = llama_inputs(pads, 14, seed=17)
    ours, our_logits = Generator(artifact).generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                                    return_logits=True)
    expected, logits = reference.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(ours, expected)
    torch.testing.assert_close(our_logits, logits, atol=1e-5, rtol=0)


def test_reference_generation_differs_when_positions_are_wrong(build, monkeypatch):
    """Guards the test above: a reference placing new tokens 3 positions later gives other logits
    (random tiny weights attend almost uniformly, so the tokens alone are not a sensitive check)."""
    plan, _, artifact = build(_spec("gen-pyramiddrop-3-stages", "tiny-llava", PRUNED["pyramiddrop-3-stages"]))
    stages = reference_stages(plan)
    reference = HookReference(_hf(plan), stages)
    ids, mask, pixels = llava_inputs(reference.model.config, [0, 2, 5], seq_len=30, seed=13)
    original = HookReference.__call__

    def shifted(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self.last_position = [p + 3 for p in self.last_position]
        return out
    monkeypatch.setattr(HookReference, "__call__", shifted)
    _, wrong = reference.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS)
    _, ours = Generator(artifact).generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                           return_logits=True)
    torch.testing.assert_close(ours[:, 0], wrong[:, 0], atol=1e-5, rtol=0)  # prefill logits agree
    assert (ours[:, 1:] - wrong[:, 1:]).abs().max() > 1e-3


def test_kv_cache_size_is_the_analytic_value_and_what_prefill_returns(build):
    plan, _, artifact = build(_spec("gen-pyramiddrop-3-stages", "tiny-llava", PRUNED["pyramiddrop-3-stages"]))
    config = plan.adapter.config.text_config
    seq_len, head_dim = 30, config.hidden_size // config.num_attention_heads
    # written out from the spec: 16 image tokens; after layers 0/1/2 keep 8/4/2 of them
    kept_per_layer = [seq_len, seq_len - 8, seq_len - 12, seq_len - 14]
    analytic = sum(2 * n * config.num_key_value_heads * head_dim * 4 for n in kept_per_layer)  # fp32
    decode = json.loads((artifact / "manifest.json").read_text())["decode"]
    assert decode["cache_lengths"] == kept_per_layer
    assert decode["kv_cache_bytes_per_row"]["pruned"] == analytic
    assert decode["kv_cache_bytes_per_row"]["unpruned"] == 2 * 4 * seq_len * config.num_key_value_heads * head_dim * 4
    generator = Generator(artifact)
    ids, mask, pixels = llava_inputs(_hf(plan).config, [0], seq_len=seq_len)
    _, keys, values, valid = generator.prefill_caches(ids, mask, pixels)
    measured = sum(t.numel() * t.element_size() for t in keys + values)
    assert measured == analytic
    assert [v.shape[-1] for v in valid] == kept_per_layer


def test_sampling_is_seeded_and_top_p_to_zero_is_greedy(build):
    plan, _, artifact = build(_spec("gen-fastv", "tiny-llava", PRUNED["fastv"]))
    generator = Generator(artifact)
    ids, mask, pixels = llava_inputs(_hf(plan).config, [0, 3], seq_len=30, seed=2)
    run = lambda sampling: generator.generate(ids, mask, pixels, max_new_tokens=12, sampling=sampling, eos_token_id=None)  # noqa: E731
    first = run(Sampling(do_sample=True, temperature=1.5, seed=1))
    assert torch.equal(first, run(Sampling(do_sample=True, temperature=1.5, seed=1)))
    assert not torch.equal(first, run(Sampling(do_sample=True, temperature=1.5, seed=2)))
    greedy = run(Sampling())
    assert torch.equal(run(Sampling(do_sample=True, top_p=1e-9, seed=3)), greedy)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(do_sample=True, temperature=0)


def test_rows_stop_at_eos_and_pad_after(build):
    plan, _, artifact = build(_spec("gen-fastv", "tiny-llava", PRUNED["fastv"]))
    generator = Generator(artifact)
    ids, mask, pixels = llava_inputs(_hf(plan).config, [0, 3], seq_len=30, seed=2)
    greedy = generator.generate(ids, mask, pixels, max_new_tokens=12, eos_token_id=None)
    eos = int(greedy[0, 1])  # row 0's second token
    stopped = generator.generate(ids, mask, pixels, max_new_tokens=12, eos_token_id=eos)
    first_eos = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in greedy]
    for b, at in enumerate(first_eos):
        if at is None:
            assert torch.equal(stopped[b], greedy[b, :stopped.shape[1]])
        else:
            assert torch.equal(stopped[b, :at + 1], greedy[b, :at + 1])
            assert (stopped[b, at + 1:] == generator.pad_token_id).all()
    if all(at is not None for at in first_eos):
        assert stopped.shape[1] == max(first_eos) + 1


def test_cli_generate_prints_what_the_api_generates(build):
    from typer.testing import CliRunner

    from prunec.adapters.base import ExampleShape
    from prunec.cli import app

    plan, _, artifact = build(_spec("gen-fastv", "tiny-llava", PRUNED["fastv"]))
    result = CliRunner().invoke(app, ["generate", str(artifact), "--max-new-tokens", "8", "--seed", "4"])
    assert result.exit_code == 0, result.output
    inputs = plan.adapter.example_inputs(ExampleShape(1, 30, 28), 4)
    expected = Generator(artifact).generate(*inputs, max_new_tokens=8)
    assert result.output.strip().splitlines()[-1] == " ".join(map(str, expected[0].tolist()))

    _, _, llama = build(_spec("gen-keep-llama", "tiny-llama", "[]", seq_len=12))
    result = CliRunner().invoke(app, ["generate", str(llama), "--input-ids", "5 6 7 8 9", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = Generator(llama).generate(ids, torch.ones_like(ids), max_new_tokens=6)
    assert result.output.strip() == " ".join(map(str, expected[0].tolist()))


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hello"], "no tokenizer"),
    (["--input-ids", "1 2 3"], "takes an image"),
    (["--input-ids", "1 x"], "must be space-separated integers"),
    (["--sample", "--temperature", "0"], "temperature must be > 0"),
])
def test_cli_generate_rejects_bad_requests(build, args, message):
    from typer.testing import CliRunner

    from prunec.cli import app

    _, _, artifact = build(_spec("gen-fastv", "tiny-llava", PRUNED["fastv"]))
    result = CliRunner().invoke(app, ["generate", str(artifact), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_generate_needs_an_artifact_built_with_decode(build):
    from typer.testing import CliRunner

    from prunec.cli import app

    _, _, artifact = build("""
        prunec: 1
        name: no-decode
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline: []
    """)
    result = CliRunner().invoke(app, ["generate", str(artifact)])
    assert result.exit_code == 2 and "built without `decode:`" in result.output, result.output


def test_cli_left_pads_a_short_prompt_for_text_pruning(build):
    from typer.testing import CliRunner

    from prunec.cli import app

    _, _, artifact = build(_spec("gen-llama-fastv", "tiny-llama", PRUNED_LLAMA["llama-fastv"], seq_len=14))
    result = CliRunner().invoke(app, ["generate", str(artifact), "--input-ids", "5 6 7 8 9", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[0] * 9 + [5, 6, 7, 8, 9]])
    mask = (torch.arange(14) >= 9).long()[None]
    expected = Generator(artifact).generate(ids, mask, max_new_tokens=4)
    assert result.output.strip() == " ".join(map(str, expected[0].tolist()))
    too_long = CliRunner().invoke(app, ["generate", str(artifact), "--input-ids", " ".join(["5"] * 15)])
    assert too_long.exit_code == 2 and "at most that long" in too_long.output
