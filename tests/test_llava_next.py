"""LLaVA-NeXT (anyres crops, base crop, newline tokens): a processor's output in, any image size.

The artifact takes `pixel_values` [images, crops, 3, H, W] (zero-padded to the most crops) and
`image_sizes` as HF's processor gives them. Keep-everything equals HF's own forward (which packs the
crops itself); pruning specs equal the HF model run with forward hooks doing the same selection
(tests/reference.py finds the newline tokens in HF's packed features, and packs each crop's [CLS]
scores as HF packs features for FasterVLM), each row alone, and every
row of a batch of three image sizes equals that row alone. Kept counts are computed here from the
formula.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from official_defaults import reference_params
from reference import HookReference

from prunec.errors import PrunecInputError
from prunec.models import load_model

ATOL = 1e-5
SIZES = ((30, 50), (60, 20), (40, 40))  # three image token counts on the tiny config (52, 76, 88)

SPEC = """
    prunec: 1
    name: next-{name}
    model: {{builtin: tiny-llava-next}}
    inputs: {{batch: 2, seq_len: 84}}
    output: {{logits: all}}
    pipeline: {pipeline}
"""

# name -> (pipeline, reference stages (kind, layer or None, positions, ratio of the row's candidates))
CASES = {
    "fastv": ("[{site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.25}}]",
              [("fastv", 1, "keep_original", 0.25)]),
    "divprune": ("[{site: projector.output, method: divprune, keep: {ratio: 0.3}}]",
                 [("divprune", None, "renumber", 0.3)]),
    "fastervlm": ("[{site: projector.output, method: fastervlm, keep: {ratio: 0.3}}]",
                  [("fastervlm", None, "renumber", 0.3)]),
    "divprune-then-fastv": ("[{site: projector.output, method: divprune, keep: {ratio: 0.5}},"
                            " {site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.2}}]",
                            [("divprune", None, "renumber", 0.5), ("fastv", 1, "keep_original", 0.2)]),
}


def _image_tokens(hf, size) -> tuple[int, int]:
    """(image tokens, newline tokens) of one image, from HF's own packing."""
    config = hf.config
    crops = _crops(hf, size)
    pixels = torch.zeros(1, crops, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        packed = hf.model.get_image_features(pixels, torch.tensor([size]), vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy
                                             ).pooler_output[0]
    return packed.shape[0], int((packed == hf.model.image_newline).all(dim=-1).sum())


def _crops(hf, size) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(size, hf.config.image_grid_pinpoints, hf.config.vision_config.image_size)


def processor_batch(hf, sizes=SIZES, seed=0):
    """What HF's processor gives for one image per row (left padding): ids, mask, pixel_values
    [rows, most crops, 3, H, W] zero-padded, image_sizes; plus each row alone."""
    gen = torch.Generator().manual_seed(seed)
    side = hf.config.vision_config.image_size
    rows = []
    for b, size in enumerate(sizes):
        n, _ = _image_tokens(hf, size)
        ids = torch.randint(3, 200, (n + 5 + b,), generator=gen)
        ids[2:2 + n] = hf.config.image_token_id
        rows.append((ids, torch.randn(1, _crops(hf, size), 3, side, side, generator=gen), torch.tensor([size])))
    length = max(len(r[0]) for r in rows) + 2
    most = max(r[1].shape[1] for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pixels = torch.zeros(len(rows), most, 3, side, side)
    for b, (row, crops, _) in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
        pixels[b, :crops.shape[1]] = crops[0]
    return (ids, mask, pixels, torch.tensor(sizes)), rows


def _built(build, name, pipeline):
    plan, module, artifact = build(SPEC.format(name=name, pipeline=pipeline))
    hf = load_model(plan.lock["model"], plan.spec.base_dir)
    return module, hf


def test_keep_everything_equals_hf_at_batch_1_and_3_image_sizes(build):
    """A stage keeping every token (the whole rewrite: layout gather, ragged selection, masks) equals HF."""
    module, hf = _built(build, "keep-all", "[{site: 'llm.layers[0]', method: fastv, keep: {ratio: 1.0}}]")
    batch, rows = processor_batch(hf)
    with torch.no_grad():
        for inputs in [(rows[0][0][None], torch.ones_like(rows[0][0])[None], rows[0][1], rows[0][2]), batch]:
            expected = hf(input_ids=inputs[0], attention_mask=inputs[1], pixel_values=inputs[2], image_sizes=inputs[3],
                          use_cache=False).logits
            actual = module(*inputs)
            for b, real in enumerate(inputs[1].bool()):  # padding dropped: a row's tokens end the row
                torch.testing.assert_close(actual[b, actual.shape[1] - int(real.sum()):], expected[b, real],
                                           atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pruning_equals_the_hook_reference_per_row_and_each_row_alone(build, name):
    pipeline, stages = CASES[name]
    module, hf = _built(build, name, pipeline)
    batch, rows = processor_batch(hf)
    with torch.no_grad():
        together = module(*batch)
    for b, (ids, pixels, size) in enumerate(rows):
        tokens, newlines = _image_tokens(hf, tuple(size[0].tolist()))
        n = tokens - newlines  # newline tokens are protected
        kept, reference_stages = n, []
        for kind, layer, positions, ratio in stages:
            exact = ratio * n  # FastV and DivPrune round half to even, FasterVLM half up (METHODS.md)
            kept = min(kept, math.floor(exact + 0.5) if kind == "fastervlm" else round(exact))
            reference_stages.append(dict(kind=kind, n_keep=kept, layer=layer, positions=positions,
                                         **reference_params(kind, {})))
        mask = torch.ones_like(ids)[None]
        with torch.no_grad():
            alone = module(ids[None], mask, pixels, size)
            expected = HookReference(hf, reference_stages)(ids[None], mask, pixels, image_sizes=size)
        hf.set_attn_implementation("sdpa")
        assert alone.shape[1] == expected.shape[1] == len(ids) - n + kept
        torch.testing.assert_close(alone, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(together[b, -alone.shape[1]:], expected[0], atol=ATOL, rtol=0)


def test_refuses_inputs_that_disagree_with_the_image_sizes_in_one_line(build):
    module, hf = _built(build, "fastv", CASES["fastv"][0])
    batch, _ = processor_batch(hf)
    ids, mask, pixels, sizes = batch
    cases = [((ids, mask, pixels[:, :2], sizes), "input image_sizes: image 0 of 30x50 takes 5 crops, pixel_values "
                                                   "holds 2 per image"),
             ((ids, mask, pixels, torch.tensor([[60, 20], [30, 50], [40, 40]])),
              "input input_ids: row 0 holds 52 image tokens (id 255), which are not whole images in order"),
             ((ids, mask, pixels[0], sizes), "input pixel_values: the artifact takes a processor's [images, crops, "
                                             "3, H, W] tensor")]
    for inputs, words in cases:
        with pytest.raises(PrunecInputError) as error:
            module(*inputs)
        assert words in str(error.value) and "\n" not in str(error.value)


def test_generation_on_three_image_sizes_equals_each_row_decoded_alone_by_the_reference(build):
    """Ragged pruned caches from a batch of three image sizes: each row's greedy tokens and logits equal
    the hook reference decoding that row alone."""
    from prunec.generate import Generator

    pipeline, stages = CASES["divprune-then-fastv"]
    plan, _, artifact = build(SPEC.format(name="gen-divprune-then-fastv", pipeline=pipeline).replace(
        "logits: all", "logits: last") + "    decode: {policy: static}\n")
    hf = load_model(plan.lock["model"], plan.spec.base_dir)
    batch, rows = processor_batch(hf, seed=2)
    ours, our_logits = Generator(artifact).generate(*batch, max_new_tokens=4, eos_token_id=None, return_logits=True)
    for b, (ids, pixels, size) in enumerate(rows):
        tokens, newlines = _image_tokens(hf, tuple(size[0].tolist()))
        n, kept, reference_stages = tokens - newlines, tokens - newlines, []
        for kind, layer, positions, ratio in stages:
            kept = min(kept, round(ratio * n))
            reference_stages.append(dict(kind=kind, n_keep=kept, layer=layer, positions=positions,
                                         **reference_params(kind, {})))
        expected, logits = HookReference(hf, reference_stages).generate(
            ids[None], torch.ones_like(ids)[None], pixels, max_new_tokens=4, image_sizes=size)
        hf.set_attn_implementation("sdpa")
        assert torch.equal(ours[b], expected[0]), b
        torch.testing.assert_close(our_logits[b], logits[0], atol=1e-4, rtol=0)


NEXT_SPECS = sorted((Path(__file__).parents[1] / "specs" / "llava-next").glob("*.yaml"))


@pytest.mark.parametrize("path", NEXT_SPECS, ids=[p.stem for p in NEXT_SPECS])
def test_published_budgets_keep_their_count_of_2880_and_scale_with_the_image(path):
    """The example specs' ratios keep the published 640/320/160 of 2,880 image tokens, and a row's own
    share of any other count (half to even for FastV and DivPrune, computed here)."""
    import prunec
    from prunec.ragged import RowBudget

    (stage,) = prunec.plan(path).stages
    published = int(path.stem.rsplit("-", 1)[1])
    budget = RowBudget.of_stage(stage)
    assert stage.ragged and budget.kept(2880, 2880) == published
    assert budget.kept(1576, 1576) == round(float(stage.keep_spec[1]) * 1576)


def test_explain_prints_the_schedule_for_given_image_sizes():
    """Image tokens from HF's own packing (`_image_tokens`); kept = FastV's half-to-even share of the
    candidates (image tokens minus newlines)."""
    from typer.testing import CliRunner

    from prunec.cli import app

    spec = Path(__file__).parents[1] / "specs" / "llava-next" / "fastv-640.yaml"
    hf = load_model({"builtin": "tiny-llava-next"}, Path("."))
    result = CliRunner().invoke(app, ["explain", str(spec), "--image-size", "30x50", "--image-size", "60x20"])
    assert result.exit_code == 0, result.output
    for size in ((30, 50), (60, 20)):
        tokens, newlines = _image_tokens(hf, size)
        kept = round(0.2222 * (tokens - newlines))
        line = next(line for line in result.output.splitlines() if line.startswith(f"{size[0]} x {size[1]} "))
        assert line.split()[3:] == [str(tokens), str(tokens - newlines), str(kept), str(tokens - newlines - kept)]
    bad = CliRunner().invoke(app, ["explain", str(spec), "--image-size", "30y50"])
    assert bad.exit_code == 2 and bad.output.strip().endswith("expected HEIGHTxWIDTH in pixels, e.g. 672x336")
