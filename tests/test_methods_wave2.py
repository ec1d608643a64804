"""Methods wave 2 (METHODS-2.md): random, pool, DART, VisPruner and EVS, each against a slow
implementation written from its description (the document's worked examples included) and, built,
against the hook reference at batch 1 and batch 3 with left padding. Their presets run the preset
tests in test_methods.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_close_on_real_tokens, llava_inputs
from reference import HookReference, reference_stages, slow_topk

import prunec
from prunec.models import load_model


def _hf(plan):
    return load_model(plan.lock["model"], plan.spec.base_dir)


def _assert_matches_hook_reference(plan, module, pads: list[int], seq_len: int, seed: int, images: int = 1):
    """The built module equals the eager hook reference on left-padded LLaVA rows; returns its output."""
    reference = HookReference(_hf(plan), reference_stages(plan))
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=seq_len, seed=seed, images=images)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    assert_close_on_real_tokens(actual, reference(ids, mask, pixels), pads, 1e-5)
    return actual


def _candidates(batch: int, seq: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b, (start, stop) in enumerate(spans):
        mask[b, start:stop] = True
    return mask


# -- random: reproducible from its seed -----------------------------------------------------------


def test_random_scores_top_k_is_the_seeded_permutations_first_k():
    from prunec.methods.random_baseline import random_scores
    from reference import slow_random

    candidates = _candidates(3, 20, [(2, 14), (0, 20), (5, 9)])
    scores = random_scores(candidates, 1234)
    for b in range(3):
        positions = candidates[b].nonzero()[:, 0].tolist()
        n = len(positions)
        for k in range(1, n + 1):
            top = slow_topk([float(scores[b, p]) for p in positions], k)
            assert top == slow_random(n, k, 1234)
    assert scores[~candidates].abs().sum() == 0


def test_random_selection_is_the_same_across_runs_and_builds_and_changes_with_the_seed(tmp_path):
    """Two builds of one spec, each run twice, give identical outputs; the lock records the seed;
    another seed selects other tokens. A row keeps what it keeps alone."""
    spec = """prunec: 1
name: random-seed-{seed}
model: {{builtin: tiny-llava}}
inputs: {{batch: 2, seq_len: 30}}
pipeline:
  - {{site: projector.output, method: random, params: {{seed: {seed}}}, keep: {{ratio: 0.25}}}}
"""
    outputs = {}
    for name, seed in [("a", 5), ("a-again", 5), ("b", 6)]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(spec.format(seed=seed))
        artifact = prunec.build(path, tmp_path / name)
        assert f"seed: {seed}" in (artifact / "spec.lock.yaml").read_text()
        module = prunec.load(artifact)
        ids, mask, pixels = llava_inputs(_hf(prunec.plan(path)).config, [0, 3, 1], seq_len=30,
                                         seed=2)
        with torch.no_grad():
            first, second = module(ids, mask, pixels), module(ids, mask, pixels)
            alone = module(ids[1:2, 3:], mask[1:2, 3:], pixels[1:2])
        assert torch.equal(first, second)
        torch.testing.assert_close(first[1:2, 3:], alone, atol=1e-5, rtol=0)
        outputs[name] = first
    assert torch.equal(outputs["a"], outputs["a-again"])
    assert not torch.allclose(outputs["a"], outputs["b"], atol=1e-3)


# -- DART: pivots by key L1 norm, duplicates by final-norm cosine --------------------------------


def test_dart_worked_example_of_methods_2():
    """METHODS-2.md §2h: image 2..7, query 8, 9; one pivot of each; TOPK 2 -> kept 2, 3, 4, 5, 6."""
    from prunec.methods.dart import dart_row

    key_l1 = torch.tensor([0.0, 0.0, 4, 1, 2, 4.5, 0.3, 1, 4, 0.2])
    hn = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1, 0], [0.95, 0.05], [0, 1], [0.7, 0.7], [-1, -0.2], [0.1, 1],
                       [0, 1], [0.3, 0.3]])
    assert dart_row(key_l1, hn, list(range(2, 8)), [8, 9], 1, 1, 2) == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("seed", range(4))
def test_dart_matches_its_description_at_llava_positions(seed):
    """LLaVA-like rows (image from position 35, pivots 4 + 4): the pivots' positions collide in the
    set's hash table, so the official iteration order is not sorted order; dart_row must follow it."""
    from prunec.methods.dart import dart_row
    from reference import slow_dart

    gen = torch.Generator().manual_seed(seed)
    image, query = list(range(35, 35 + 96)), list(range(131, 160))
    key_l1 = torch.rand(160, generator=gen)
    hidden = torch.randn(160, 6, generator=gen)
    assert dart_row(key_l1, hidden, image, query, 4, 4, 5) == slow_dart(key_l1.tolist(), hidden, image, query,
                                                                            4, 4, 5)


def test_dart_counts_are_the_official_ones(tmp_path):
    """Budgets 64/128/192 keep 68/132/196 of 576 image tokens (4 + 8 TOPK); ratio 0.2222 keeps
    4 + 8 x floor(127.99 / 8) = 124 (the Qwen2.5-VL / LightCompress rule); explain says why."""
    from prunec.explain import stage_table
    from prunec.models import BUILTIN_CONFIGS

    config = json.loads(json.dumps(BUILTIN_CONFIGS["tiny-llava"]))
    config["vision_config"].update(image_size=96, patch_size=4)  # 24 x 24 = 576 patches
    config["text_config"]["max_position_embeddings"] = 1024
    (tmp_path / "config.json").write_text(json.dumps(config))
    for budget, kept in [("count: 64", 68), ("count: 128", 132), ("count: 192", 196), ("ratio: 0.2222", 124)]:
        spec = tmp_path / "dart.yaml"
        spec.write_text("prunec: 1\nname: dart-counts\nmodel: {config: config.json}\n"
                        "inputs: {batch: 1, seq_len: 620}\n"
                        f"pipeline:\n  - {{site: 'llm.layers[1]', method: dart, keep: {{{budget}}}}}\n")
        plan = prunec.plan(spec)
        assert plan.stages[0].n_keep == kept
        assert f"keeps {kept} candidates, as the official code counts" in stage_table(plan)


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
def test_dart_matches_hook_reference_with_a_non_uniform_final_norm(tmp_path_factory, build, pads):
    """A model whose final norm weights are not all 1 (else the norm cannot change a cosine): the
    artifact equals the hook reference, which runs DART on the final-norm hidden states."""
    weights = tmp_path_factory.getbasetemp() / "dart-weights"
    if not weights.exists():
        model = load_model({"builtin": "tiny-llava", "seed": 0}, weights.parent)
        with torch.no_grad():
            norm = model.model.language_model.norm.weight
            norm.copy_(torch.rand(norm.shape, generator=torch.Generator().manual_seed(1)) * 2)
        model.save_pretrained(weights)
    plan, module, _ = build(f"""
        prunec: 1
        name: dart-norm
        model: {{path: {weights}}}
        inputs: {{batch: 2, seq_len: 30}}
        pipeline:
          - {{site: "llm.layers[1]", method: dart, params: {{pivots_image: 2, pivots_text: 2}}, keep: {{count: 8}}}}
    """)
    _assert_matches_hook_reference(plan, module, pads, seq_len=30, seed=5 + len(pads))
    assert plan.stages[0].n_keep == 10


# -- pool: each image's token grid, adaptive bins ----------------------------------------------------


@pytest.mark.parametrize("n_keep,grid", [(25, (5, 5)), (64, (8, 8)), (144, (12, 12)), (128, (8, 16)),
                                         (96, (8, 12))])
def test_pool_matches_the_adaptive_bins_of_methods_2(n_keep, grid):
    """24 x 24 tokens (LLaVA-1.5): the default grid is the square side, else the factor pair nearest
    the image's aspect (128 -> 8 x 16, METHODS-2.md §4.2); values are the means over the bins
    [floor(i h / o), ceil((i + 1) h / o)) (24 -> 5 overlaps: [0,5) [4,10) [9,15) [14,20) [19,24))."""
    from prunec.methods.pool import output_grid, pool_grid
    from reference import slow_pool

    assert output_grid(n_keep, (24, 24)) == grid
    features = torch.randn(2, 576, 6, generator=torch.Generator().manual_seed(n_keep))
    for mode in ("avg", "max"):
        slots, values = pool_grid(features, n_keep, mode=mode)
        for b in range(2):
            expected_slots, expected = slow_pool(features[b], *grid, mode)
            assert slots[b].tolist() == expected_slots
            torch.testing.assert_close(values[b].double(), torch.stack(expected), atol=1e-6, rtol=0)
    assert slow_pool(torch.arange(576.0)[:, None], 5, 5, "avg")[0][:5] == [0, 4, 9, 14, 19]


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
def test_pool_per_image_with_a_written_grid_matches_hook_reference(build, pads):
    """Two images per row, each 4 x 4 grid max-pooled to 1 x 3 (overlapping column bins [0,2) [1,3) [2,4))."""
    plan, module, _ = build("""
        prunec: 1
        name: pool-two-images
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 50, images: 2}
        pipeline:
          - {site: projector.output, method: pool, params: {grid: [1, 3], mode: max}, keep: {count: 6}}
    """)
    actual = _assert_matches_hook_reference(plan, module, pads, seq_len=50, seed=3 + len(pads), images=2)
    assert actual.shape[1] == 50 - 32 + 6


def test_pool_refuses_a_budget_no_grid_fits(tmp_path):
    spec = tmp_path / "pool.yaml"
    spec.write_text("prunec: 1\nname: pool-bad\nmodel: {builtin: tiny-llava}\ninputs: {batch: 1, seq_len: 40}\n"
                    "pipeline:\n  - {site: projector.output, method: pool, keep: {count: 5}}\n")
    with pytest.raises(prunec.errors.SpecError, match=r"pool\.yaml:6:58: error at /pipeline/0/keep/count: pool keeps 5 "
                                                      r"tokens per image of a 4 x 4 grid"):
        prunec.plan(spec)


# -- VisPruner: important by [CLS], diverse by dropping duplicates in rounds ----------------------------


def test_vispruner_worked_example_of_methods_2():
    """METHODS-2.md §3i (per-round cap 2): T 6, ratio 0.34 -> important [0, 2], rounds drop 7, 3 then
    8, 5 -> kept [0, 1, 2, 4, 6, 9]."""
    from prunec.methods.vispruner import important_diverse
    from reference import slow_vispruner

    cls = [0.30, 0.02, 0.20, 0.05, 0.04, 0.10, 0.03, 0.08, 0.12, 0.06]
    angles = torch.tensor([0, 5, 90, 10, 180, 95, 270, 185, 45, 60], dtype=torch.float64) * math.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert important_diverse(torch.tensor(cls), features, 6, 0.34, 2).tolist() == [0, 1, 2, 4, 6, 9]
    assert slow_vispruner(cls, features, 6, 0.34, 2) == [0, 1, 2, 4, 6, 9]


@pytest.mark.parametrize("n,n_keep,ratio,per_round", [(144, 32, 0.5, 8), (144, 16, 0.75, 8), (100, 17, 0.5, 8),
                                                      (49, 9, 0.3, 3), (30, 5, 0.0, 4)])
def test_vispruner_matches_its_description(n, n_keep, ratio, per_round):
    from prunec.methods.vispruner import important_diverse
    from reference import slow_vispruner

    gen = torch.Generator().manual_seed(n + n_keep)
    cls, features = torch.rand(n, generator=gen), torch.randn(n, 5, generator=gen)
    assert important_diverse(cls, features, n_keep, ratio, per_round).tolist() == \
        slow_vispruner(cls.tolist(), features, n_keep, ratio, per_round)


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
def test_vispruner_cls_free_importance_matches_hook_reference(build, pads):
    """`importance: mean_received` (the official SigLIP path): important tokens by the attention each patch
    receives, averaged over every query row and head of the feature layer; the reference reads HF's own
    attention maps. The [CLS] form on the same inputs keeps other tokens (the variant is not a no-op)."""
    spec = """
        prunec: 1
        name: vispruner-{name}
        model: {{builtin: tiny-llava}}
        inputs: {{batch: 2, seq_len: 30}}
        pipeline:
          - {{site: projector.output, method: vispruner, params: {{importance: {importance}, important_ratio: 0.75}},
              keep: {{count: 8}}}}
    """
    plan, module, _ = build(spec.format(name="received", importance="mean_received"))
    received = _assert_matches_hook_reference(plan, module, pads, seq_len=30, seed=9 + len(pads))
    plan, module, _ = build(spec.format(name="cls", importance="cls"))
    by_cls = _assert_matches_hook_reference(plan, module, pads, seq_len=30, seed=9 + len(pads))
    assert not torch.allclose(received, by_cls)


# -- EVS (vLLM): frame change against the previous frame ---------------------------------------------


def test_evs_worked_example_of_methods_2():
    """METHODS-2.md §5.1g: 3 frames of 2 x 2, q 0.5 -> k = max(4, int(12 x 0.5)) = 6; kept mask
    [[1,1,1,1], [0,0,1,0], [0,1,0,0]]: the 0.2929 tie between flat 9 and 11 goes to 9."""
    from prunec.methods.evs import evs_scores
    from reference import slow_evs

    frames = torch.tensor([[[1, 0], [0, 1], [1, 1], [1, -1]], [[1, 0.1], [0, 1], [-1, 1], [1, -1]],
                           [[1, 0.1], [1, 1], [-1, 1], [0, -1]]]).reshape(1, 12, 2)
    expected = [0, 1, 2, 3, 6, 9]
    assert slow_evs(frames[0], 3, 6) == expected
    candidates = torch.ones(1, 12, dtype=torch.bool)
    kept = torch.ops.prunec.select_topk(evs_scores(frames, candidates, 12, 3), candidates, 12, 6)
    assert kept[0].tolist() == expected


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
def test_evs_on_a_row_of_frames_matches_hook_reference(build, pads):
    """Three 4 x 4 frames per row, keep 0.41 of 48 = int(19.68) = 19 (vLLM rounds down), every token of the first
    frame among them."""
    plan, module, _ = build("""
        prunec: 1
        name: evs-frames
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 72, images: 3}
        pipeline:
          - {site: projector.output, method: evs, keep: {ratio: 0.41}}
    """)
    assert plan.stages[0].n_keep == 19
    _assert_matches_hook_reference(plan, module, pads, seq_len=72, seed=8 + len(pads), images=3)


def test_evs_refuses_a_budget_below_one_frame(tmp_path):
    spec = tmp_path / "evs.yaml"
    spec.write_text("prunec: 1\nname: evs-small\nmodel: {builtin: tiny-llava}\ninputs: {batch: 1, seq_len: 60, "
                    "images: 3}\npipeline:\n  - {site: projector.output, method: evs, keep: {count: 15}}\n")
    with pytest.raises(prunec.errors.SpecError,
                       match=r"evs\.yaml:6:57: error at /pipeline/0/keep/count: EVS keeps every token of the first frame \(16\)"):
        prunec.plan(spec)


# -- CDPruner: conditional DPP, greedy MAP, the rank guard -------------------------------------------


GOLDEN_F = [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.3], [0, 0, 1], [0.5, 0.5, 0.5]]


def test_cdpruner_worked_example_of_methods_2():
    """METHODS-2.md §1h (E := F, the official negated relevance): r = [1e-6, 0.10913, 0.98821, 1, 0.19764,
    0.68465]; picks 3, 5, 2 -> kept [2, 3, 5]."""
    from prunec.methods.cdpruner import cdpruner_keep, relevance
    from reference import slow_cdpruner

    features, query = torch.tensor(GOLDEN_F), torch.tensor([[0, -1, -0.2]])
    torch.testing.assert_close(relevance(features, query, -1.0),
                               torch.tensor([1.0e-6, 0.10913, 0.98821, 1.0, 0.19764, 0.68465], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert cdpruner_keep(features, query, 3, -1.0) == [2, 3, 5]
    assert slow_cdpruner(features, query, 3, -1) == ([3, 5, 2], [2, 3, 5])


def test_cdpruner_rank_deficient_kernel_fills_by_relevance():
    """2-D features (no zero rows) give a rank-2 kernel: the official greedy turns to NaN at the third pick;
    prunec keeps the two DPP picks and adds the most relevant remaining token."""
    from prunec.methods.cdpruner import cdpruner_keep
    from reference import slow_cdpruner

    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [2.0, 1.0]])
    query = torch.tensor([[1.0, 0.2]])
    order, kept = slow_cdpruner(features, query, 4, 1)
    assert cdpruner_keep(features, query, 4, 1.0) == kept
    assert len(kept) == 4 and len(set(kept)) == 4


@pytest.mark.parametrize("seed", range(3))
def test_cdpruner_matches_its_description(seed):
    from prunec.methods.cdpruner import cdpruner_keep
    from reference import slow_cdpruner

    gen = torch.Generator().manual_seed(seed)
    features, query = torch.randn(40, 12, generator=gen), torch.randn(5, 12, generator=gen)
    assert cdpruner_keep(features, query, 10, 1.0) == slow_cdpruner(features, query, 10, 1)[1]


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
def test_cdpruner_matches_hook_reference(build, pads):
    plan, module, _ = build("""
        prunec: 1
        name: cdpruner-test
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: projector.output, method: cdpruner, keep: {count: 5}}
    """)
    _assert_matches_hook_reference(plan, module, pads, seq_len=30, seed=4 + len(pads))


# -- VidCom2 (vLLM's exact count) ------------------------------------------------------------------------


def test_vidcom2_frame_budgets_worked_example_of_methods_2():
    """METHODS-2.md §5.2e: 4 frames of 196, base 0.25, u = [-1.0, -1.2, -1.5, -1.3] -> k = [86, 37, 37, 37]."""
    from prunec.methods.vidcom2 import frame_budgets

    assert frame_budgets(torch.tensor([-1.0, -1.2, -1.5, -1.3], dtype=torch.float64), 0.25, 196).tolist() == \
        [86, 37, 37, 37]


@pytest.mark.parametrize("frames,per,width,n_keep,base", [(4, 16, 6, 16, 0.25), (3, 9, 5, 11, 0.4), (5, 8, 7, 6, 0.15),
                                                      (4, 16, 6, 12, 0.25)])  # 16 -> 16, 10 -> 11, 6 -> 6, 16 -> 12
def test_vidcom2_matches_its_description(frames, per, width, n_keep, base):
    from prunec.methods.vidcom2 import vidcom2_keep
    from reference import slow_vidcom2

    features = torch.randn(frames * per, width, generator=torch.Generator().manual_seed(frames * per))
    assert vidcom2_keep(features, frames, n_keep, base).tolist() == slow_vidcom2(features, frames, n_keep, base)


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
def test_vidcom2_on_a_row_of_frames_matches_hook_reference(build, pads):
    """Three 4 x 4 frames per row; ratio 0.3 -> int(14.4) = 14 tokens, base 0.3."""
    plan, module, _ = build("""
        prunec: 1
        name: vidcom2-frames
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 72, images: 3}
        pipeline:
          - {site: projector.output, method: vidcom2, keep: {ratio: 0.3}}
    """)
    assert plan.stages[0].n_keep == 14
    _assert_matches_hook_reference(plan, module, pads, seq_len=72, seed=6 + len(pads), images=3)
