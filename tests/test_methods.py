"""The method library: each method against a slow reference written from its formula, every preset
against a hook-based eager reference, and score fusion composed in YAML."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_close_on_kept_real_tokens, assert_close_on_real_tokens, llama_inputs, llava_inputs
from reference import (HookReference, VisionStagesReference, fuse_rows, reference_stages, slow_divprune_order,
                       slow_pagerank, slow_ranks, slow_topk, slow_ttv)

import prunec
from prunec.methods import get_method, method_names
from prunec.methods.divprune import diversity_order_scores
from prunec.methods.fastervlm import cls_attention
from prunec.methods.fuse import fuse_scores
from prunec.methods.transprune import instruction_attention, token_transition
from prunec.models import load_model

PRESETS = sorted((REPO / "specs").glob("*.yaml"))


def _candidates(batch: int, seq: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b, (start, stop) in enumerate(spans):
        mask[b, start:stop] = True
    return mask


# -- golden tests: pure functions against formulas ---------------------------------------------


@pytest.mark.parametrize("batch, seq, dim", [(1, 5, 8), (3, 23, 40), (2, 64, 17)])
@pytest.mark.parametrize("cos", ["signed", "abs"])
def test_ttv_matches_its_formula(batch, seq, dim, cos):
    gen = torch.Generator().manual_seed(seq)
    x_in = torch.randn(batch, seq, dim, generator=gen)
    x_out = 0.3 * x_in + torch.randn(batch, seq, dim, generator=gen)
    valid = torch.arange(seq)[None, :] >= (torch.arange(batch) * 2)[:, None]  # left padding 0, 2, 4
    actual = token_transition(x_in, x_out, valid, cos)
    for b in range(batch):
        expected = slow_ttv(x_in[b], x_out[b], valid[b].tolist(), absolute=cos == "abs")
        torch.testing.assert_close(actual[b].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def _slow_instruction_attention(q, k, candidates, causal_pad):
    """IGA from its definition, one row and head at a time: query rows after the last candidate,
    keys up to the row (causal) and past the row's padding; softmax, head mean, row mean."""
    batch, heads, seq, hd = q.shape
    out = torch.zeros(batch, seq, dtype=torch.float64)
    for b in range(batch):
        last = max(i for i in range(seq) if candidates[b, i])
        rows = range(last + 1, seq)
        for r in rows:
            keys = [j for j in range(seq) if causal_pad[b] <= j <= r]
            for h in range(heads):
                kh = k[b, h // (heads // k.shape[1])]
                logits = [float(q[b, h, r].double() @ kh[j].double()) * hd ** -0.5 for j in keys]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for j, w in zip(keys, weights):
                    out[b, j] += w / sum(weights) / heads / len(rows)
    return out


@pytest.mark.parametrize("batch, seq, heads, kv_heads, spans", [
    (1, 12, 2, 2, [(2, 8)]),
    (3, 20, 4, 2, [(3, 10), (5, 17), (4, 19)]),  # instruction lengths 10, 3, 1
])
def test_iga_matches_its_formula(batch, seq, heads, kv_heads, spans):
    gen = torch.Generator().manual_seed(seq)
    q = torch.randn(batch, heads, seq, 8, generator=gen)
    k = torch.randn(batch, kv_heads, seq, 8, generator=gen)
    pads = [0, 1, 2][:batch]
    valid = torch.arange(seq)[None, :] >= torch.tensor(pads)[:, None]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, S, S] bool
    candidates = _candidates(batch, seq, spans)
    actual = instruction_attention(q, k, mask, 8 ** -0.5, False, candidates)
    torch.testing.assert_close(actual.double(), _slow_instruction_attention(q, k, candidates, pads), atol=1e-6, rtol=0)
    causal_flag = instruction_attention(q, k, valid[:, None, None, :], 8 ** -0.5, True, candidates)
    torch.testing.assert_close(causal_flag, actual, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch, tokens, heads", [(1, 5, 2), (3, 17, 4)])
def test_fastervlm_cls_attention_matches_its_formula(batch, tokens, heads):
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(batch, heads, tokens, 8, generator=gen)
    k = torch.randn(batch, heads, tokens, 8, generator=gen)
    actual = cls_attention(q, k, None, 0.3)
    for b in range(batch):
        for j in range(tokens):
            expected = sum(math.exp(0.3 * float(q[b, h, 0] @ k[b, h, j])) /
                           sum(math.exp(0.3 * float(q[b, h, 0] @ k[b, h, i])) for i in range(tokens))
                           for h in range(heads)) / heads
            assert abs(float(actual[b, j]) - expected) < 1e-6


@pytest.mark.parametrize("batch, n, dim, n_keep", [(1, 6, 4, 2), (2, 19, 7, 5)])
@pytest.mark.parametrize("pivot", ["first", "farthest_nearest"])
def test_todre_k_center_matches_its_description(batch, n, dim, n_keep, pivot):
    from prunec.methods.todre import k_center_keep

    features = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(n))
    kept = k_center_keep(features, n_keep, pivot=pivot)
    for b in range(batch):
        first = 0 if pivot == "first" else None
        assert kept[b].tolist() == sorted(slow_divprune_order(features[b], n_keep, first))


def test_count_zero_drops_every_candidate_and_a_ratio_rounding_to_zero_is_refused(tmp_path):
    from prunec.errors import SpecError

    base = "prunec: 1\nname: z\nmodel: {builtin: tiny-llava}\ninputs: {seq_len: 30}\npipeline:\n"
    spec = tmp_path / "zero.yaml"
    spec.write_text(base + "  - {site: 'llm.layers[1]', method: fastv, keep: {count: 0}}\n")
    assert prunec.plan(spec).stages[0].n_keep == 0
    spec.write_text(base + "  - {site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.01}}\n")
    with pytest.raises(SpecError, match="write `count: 0`"):
        prunec.plan(spec)
    spec.write_text(base + "  - {site: projector.output, method: aim_merge, keep: {count: 0}}\n")
    with pytest.raises(SpecError, match="a merge keeps at least one token"):
        prunec.plan(spec)


@pytest.mark.parametrize("batch, n, dim", [(1, 6, 4), (2, 19, 7)])
def test_divprune_score_form_is_minus_the_pick_step(batch, n, dim):
    features = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(n))
    actual = diversity_order_scores(features)
    for b in range(batch):
        order = slow_divprune_order(features[b], n)
        assert actual[b].tolist() == [-float(order.index(i)) for i in range(n)]


def _slow_probs(q, k, scale, allowed) -> torch.Tensor:
    """[B, H, S, S] softmax attention from the definition, one (row, head, query) at a time;
    allowed(b, i, j) says whether query i may attend to key j. A row with no key is all zeros."""
    batch, heads, seq, _ = q.shape
    out = torch.zeros(batch, heads, seq, seq, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kh = k[b, h // (heads // k.shape[1])].double()
            for i in range(seq):
                keys = [j for j in range(seq) if allowed(b, i, j)]
                if not keys:
                    continue
                logits = [float(q[b, h, i].double() @ kh[j]) * scale for j in keys]
                top = max(logits)
                total = sum(math.exp(x - top) for x in logits)
                for j, x in zip(keys, logits):
                    out[b, h, i, j] = math.exp(x - top) / total
    return out


def _qk(batch, heads, kv_heads, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, seq, 8, generator=gen), torch.randn(batch, kv_heads, seq, 8, generator=gen)


@pytest.mark.parametrize("batch, heads, kv_heads, seq", [(1, 2, 2, 9), (3, 4, 2, 14)])
def test_llm_attention_map_scores_match_their_formulas(batch, heads, kv_heads, seq):
    """SpAtten, AIM, Zero-TPrune, A2SF, LazyLLM on a causal, left-padded batch, against loop-built
    probabilities."""
    from prunec.methods.a2sf import forgetting_attention
    from prunec.methods.aim import sharpened_pagerank
    from prunec.methods.fastv import attention_received
    from prunec.methods.spatten import cumulative_attention
    from prunec.methods.zero_tprune import weighted_pagerank
    from reference import slow_a2sf, slow_pagerank, slow_spatten_layer

    q, k = _qk(batch, heads, kv_heads, seq, seq)
    pads = [0, 2, 4][:batch]
    valid = torch.arange(seq)[None, :] >= torch.tensor(pads)[:, None]
    mask = (torch.ones(seq, seq, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
    candidates = valid.clone()
    candidates[:, -1] = False
    args = ([q], [k], [mask], [0.35], False, valid)
    probs = _slow_probs(q, k, 0.35, lambda b, i, j: pads[b] <= j <= i)
    tau, iterations = 0.3, 4
    sharp = _slow_probs(q, k, 0.35 / tau, lambda b, i, j: pads[b] <= j <= i)  # softmax(logits / tau)
    checks = {
        "spatten": (cumulative_attention(*args), [slow_spatten_layer(probs[b], valid[b].tolist()) for b in range(batch)]),
        "aim": (sharpened_pagerank(*args, temperature=tau, iterations=iterations),
                [slow_pagerank(sharp[b], [1.0 / (seq - pads[b]) * float(v) for v in valid[b]], iterations)
                 for b in range(batch)]),
        "zero_tprune": (weighted_pagerank(*args, iterations=iterations),
                        [slow_pagerank(probs[b], [1.0 / (seq - pads[b]) * float(v) for v in valid[b]], iterations)
                         for b in range(batch)]),
        "a2sf": (forgetting_attention(*args, candidates=candidates, forgetting=0.8, recent=3),
                 [slow_a2sf(probs[b], valid[b].tolist(), 0.8, 3, candidates[b].nonzero().flatten().tolist())
                  for b in range(batch)]),
        "lazyllm": (attention_received(q, k, mask, 0.35, False, "last"), [probs[b].mean(dim=0)[-1].tolist()
                                                                           for b in range(batch)]),
    }
    for name, (actual, expected) in checks.items():
        expected = torch.tensor(expected, dtype=torch.float64)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(actual)), name
        torch.testing.assert_close(actual.double()[finite], expected[finite], atol=1e-6, rtol=1e-5, msg=name)
        for b in range(batch):  # and the same selection, ties to the lower index
            cands = candidates[b].nonzero().flatten().tolist()
            n_keep = len(cands) // 2
            top = torch.sort(actual[b, cands], descending=True, stable=True).indices[:n_keep].sort().values.tolist()
            assert top == slow_topk([float(expected[b, c]) for c in cands], n_keep), name


@pytest.mark.parametrize("batch, heads, side", [(1, 2, 3), (2, 4, 4)])
def test_vision_attention_map_methods_match_their_formulas(batch, heads, side):
    """Zero-TPrune, VTC-CLS, HiPrune and FoPru (rank and row) on [CLS] + a side x side grid."""
    from prunec.methods.fopru import fopru_keep
    from prunec.methods.hiprune import hiprune_keep
    from prunec.methods.vtc_cls import cls_attention_sum
    from prunec.methods.zero_tprune import weighted_pagerank
    from reference import slow_fopru_rows, slow_hiprune, slow_received

    seq = side * side + 1
    layers = [_qk(batch, heads, heads, seq, seed) for seed in (1, 2)]
    probs = [_slow_probs(q, k, 0.4, lambda b, i, j: True) for q, k in layers]
    qs, ks = [q for q, _ in layers], [k for _, k in layers]
    lists = (qs, ks, [None, None], [0.4, 0.4], False)
    pagerank = weighted_pagerank(qs[1:], ks[1:], [None], [0.4], False, None, iterations=7)
    vtc = cls_attention_sum(*lists, None)
    n = side * side
    for b in range(batch):
        expected = slow_pagerank(probs[1][b], [1.0 / seq] * seq, 7)
        torch.testing.assert_close(pagerank[b].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=1e-5)
        cls_sum = [float(probs[0][b, :, 0, j].mean() + probs[1][b, :, 0, j].mean()) for j in range(seq)]
        torch.testing.assert_close(vtc[b].double(), torch.tensor(cls_sum, dtype=torch.float64), atol=1e-7, rtol=1e-5)
    for n_keep, alpha in [(n // 2, 1.0), (n - 1, 0.6), (2, 0.1)]:
        kept = hiprune_keep(*lists, n, n_keep, alpha=alpha)
        for b in range(batch):
            obj, deep = (slow_received(p[b])[1:] for p in probs)
            assert kept[b].tolist() == slow_hiprune(obj, deep, n_keep, alpha), (n_keep, alpha)
        for strategy in ("rank", "row"):
            kept = fopru_keep(qs[1:], ks[1:], [None], [0.4], False, n, n_keep, strategy=strategy)
            for b in range(batch):
                score = slow_received(probs[1][b])[1:]
                expected = slow_topk(score, n_keep) if strategy == "rank" else slow_fopru_rows(score, n_keep)
                assert kept[b].tolist() == expected, strategy


@pytest.mark.parametrize("batch, heads, side, n_keep, share", [
    (1, 2, 3, 4, 0.5),     # odd N: B takes the extra token
    (2, 4, 4, 6, 0.5),
    (2, 2, 5, 10, 1.0),    # S wants all 15 removals, takes |A| = 12; I removes 3
    (3, 2, 4, 9, 0.0),     # no S-stage: the I-stage alone on the whole graph
])
def test_zero_tprune_s_then_i_matches_its_description(batch, heads, side, n_keep, share):
    from prunec.methods.zero_tprune import similarity_then_importance_keep
    from reference import slow_zero_tprune_si

    seq = side * side + 1
    q, k = _qk(batch, heads, heads, seq, side + n_keep)
    probs = _slow_probs(q, k, 0.4, lambda b, i, j: True)
    kept = similarity_then_importance_keep([q], [k], [None], [0.4], False, seq - 1, n_keep, iterations=6,
                                           similarity_share=share)
    for b in range(batch):
        assert kept[b].tolist() == slow_zero_tprune_si(probs[b], k[b].mean(dim=0), 1, n_keep, 6, share)
    if share == 0.0:  # equals the I-stage method's top n_keep
        from prunec.methods.zero_tprune import weighted_pagerank

        scores = weighted_pagerank([q], [k], [None], [0.4], False, None, iterations=6)[:, 1:]
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_keep].sort(dim=1).values
        assert kept.tolist() == top.tolist()


@pytest.mark.parametrize("batch, heads, seq", [(1, 2, 10), (3, 4, 17)])
def test_flowcut_matches_its_description(batch, heads, seq):
    from prunec.methods.flowcut import flow_scores
    from reference import slow_flow_score

    gen = torch.Generator().manual_seed(seq)
    layers = [[torch.randn(batch, seq, heads * 4, generator=gen) for _ in range(3)] for _ in range(2)]  # q, k, v
    split = [[t.view(batch, seq, heads, 4).transpose(1, 2) for t in layer] for layer in layers]
    candidates = torch.arange(seq)[None, :].expand(batch, -1) >= 1
    prior = torch.rand(batch, seq, generator=gen)
    actual = flow_scores([q for q, _, _ in split], [k for _, k, _ in split], [None, None], [0.5, 0.5], False, None,
                         candidates=candidates, values=[v for _, _, v in split], prior=prior)
    for b in range(batch):
        expected = prior[b].double()
        for q, k, v in layers:
            expected = 0.5 * expected + 0.5 * torch.tensor(slow_flow_score(q[b], k[b], v[b], heads, 1), dtype=torch.float64)
        torch.testing.assert_close(actual[b, 1:].double(), expected[1:], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("batch, side, crops, n_keep", [(1, 4, 4, 6), (2, 4, 2, 5), (2, 6, 4, 20)])
def test_holov_matches_its_description(batch, side, crops, n_keep):
    from prunec.methods.holov import holov_keep
    from reference import slow_holov

    n = side * side
    q, k = _qk(batch, 2, 2, n + 1, seed=n_keep)
    features = torch.randn(batch, n, 5, generator=torch.Generator().manual_seed(side + crops))
    kept = holov_keep([q], [k], [None], [0.4], False, n, n_keep, features, crops=crops, alpha=0.09)
    probs = _slow_probs(q, k, 0.4, lambda b, i, j: True)
    for b in range(batch):
        cls = probs[b, :, 0].mean(dim=0)[1:].tolist()
        assert kept[b].tolist() == slow_holov(features[b], cls, n_keep, crops, 0.09)


@pytest.mark.parametrize("batch, n, dim, n_keep", [(1, 8, 4, 2), (2, 16, 6, 4), (3, 13, 5, 9), (2, 16, 6, 7)])
def test_aim_merge_matches_its_description(batch, n, dim, n_keep):
    from prunec.methods.aim_merge import bipartite_mean_merge
    from reference import slow_aim_merge

    features = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(n + n_keep))
    index, merged = bipartite_mean_merge(features, n_keep)
    for b in range(batch):
        kept, values = slow_aim_merge(features[b], n_keep)
        assert index[b].tolist() == kept
        torch.testing.assert_close(merged[b].double(), torch.stack(values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch, n, dim, n_keep, alignment", [(1, 9, 6, 4, 0.7), (3, 16, 8, 7, 0.7), (2, 25, 5, 10, 2.0),
                                                          (2, 12, 4, 5, 0.0)])
def test_catp_stage1_matches_its_formulas(batch, n, dim, n_keep, alignment):
    from prunec.methods.catp import facility_location_keep
    from reference import slow_catp

    gen = torch.Generator().manual_seed(n + n_keep)
    features = torch.randn(batch, n, dim, generator=gen)
    texts = [torch.randn(3 + b, dim, generator=gen) for b in range(batch)]
    if batch > 1:
        texts[-1] = None  # a row without text after its image
    text = torch.stack([t.mean(dim=0) if t is not None else torch.zeros(dim) for t in texts])
    actual = facility_location_keep(features, n_keep, text, alignment=alignment)
    for b in range(batch):
        assert actual[b].tolist() == slow_catp(features[b], texts[b], n_keep, alignment)


def test_local_outlier_count_matches_scikit_learn_and_the_definition():
    from sklearn.neighbors import LocalOutlierFactor

    from prunec.methods.recoverable import local_outlier_count
    from reference import slow_lof

    gen = torch.Generator().manual_seed(5)
    values = torch.softmax(torch.randn(4, 40, generator=gen) * 2.5, dim=-1)  # attention-like: a few peaks
    seen = []
    for neighbours in (20, 5, 60):  # 60 > N - 1: every other value is a neighbour
        counts = local_outlier_count(values, neighbours).tolist()
        for b in range(values.shape[0]):
            lof = LocalOutlierFactor(n_neighbors=min(neighbours, 39)).fit(values[b].double().numpy()[:, None])
            assert counts[b] == int((lof.negative_outlier_factor_ < -1.5).sum())
            assert counts[b] == sum(f > 1.5 for f in slow_lof(values[b].double().tolist(), neighbours))
        seen += counts
    assert min(seen) == 0 and 0 < max(seen) < values.shape[1]  # rows with and without outliers


@pytest.mark.parametrize("batch, heads, n, n_keep, share, split", [
    (1, 2, 16, 6, None, False),   # no LOF outliers: text similarity picks all
    (3, 4, 36, 16, None, True),   # 12-13 outliers: both steps pick
    (2, 2, 25, 8, None, True),
    (2, 2, 25, 8, 0.5, None),     # a fixed share
    (2, 3, 20, 2, None, False)])
def test_recoverable_matches_its_description(batch, heads, n, n_keep, share, split):
    from prunec.methods.recoverable import local_outlier_count, recover_keep
    from reference import slow_joint_cls_attention, slow_recoverable

    gen = torch.Generator().manual_seed(n + n_keep)
    head_dim = 4
    q = torch.randn(batch, heads, n + 1, head_dim, generator=gen) * 2  # [CLS] + n patches
    k = torch.randn(batch, heads, n + 1, head_dim, generator=gen) * 2
    features = torch.randn(batch, n, 6, generator=gen)
    texts = [torch.randn(3 + b, 6, generator=gen) for b in range(batch)]
    if batch > 1:
        texts[-1] = None  # a row without text after its image
    text = torch.stack([t.mean(dim=0) if t is not None else torch.zeros(6) for t in texts])
    actual = recover_keep([q], [k], [None], [head_dim ** -0.5], False, n, n_keep, features=features, text=text,
                          visual_share=share)
    for b in range(batch):
        a = slow_joint_cls_attention(q[b, :, 0].flatten(), k[b].transpose(0, 1).flatten(1))[1:]
        expected = slow_recoverable(features[b], texts[b], a, n_keep, 20, share)
        assert actual[b].tolist() == expected
    logits = torch.einsum("bhd,bhsd->bs", q[:, :, 0], k) / math.sqrt(heads * head_dim)
    visual = local_outlier_count(torch.softmax(logits, dim=-1)[:, 1:], 20)
    if split is not None:  # the case covers what it says
        assert bool(((visual > 0) & (visual < n_keep)).all()) == split


@pytest.mark.parametrize("batch, side, cell, n_keep, threshold", [
    (1, 4, 2, 6, 1.2),       # 2 x 2 cells, a non-empty G
    (2, 5, 2, 12, 1.1),      # 3 x 3 cells, the last row and column of cells narrower
    (2, 6, 4.5, 5, 39.26),   # 2 x 2 cells, the released t: G empty, every query counts
    (3, 4, 1.5, 14, 1.0),    # 9 cells of 1-4 patches: some keep all theirs directly, so the top-up decides
])
def test_vflowopt_matches_its_description(batch, side, cell, n_keep, threshold):
    from prunec.methods.vflowopt import recycle
    from reference import slow_vflowopt

    n = side * side
    n_keep = min(n_keep, n)
    q, k = _qk(batch, 2, 2, n + 1, seed=side + n_keep)
    features = torch.randn(batch, n, 5, generator=torch.Generator().manual_seed(side))
    pixels = torch.randn(batch, 3, side * 3, side * 3, generator=torch.Generator().manual_seed(n_keep)) * 1.5
    weight = 0.0 if threshold > 1.1 else 0.02 * side  # the entropy term on, at a weight comparable to I
    index, merged = recycle(features, n_keep, [q], [k], [None], [0.4], False, threshold=threshold, cell=cell,
                            pixels=pixels, entropy_weight=weight)
    probs = _slow_probs(q, k, 0.4, lambda b, i, j: True)
    for b in range(batch):
        kept, values = slow_vflowopt(features[b], probs[b], n_keep, threshold, cell, pixels[b], weight)
        assert index[b].tolist() == kept
        torch.testing.assert_close(merged[b].double(), torch.stack(values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch, side, n_keep, contextual", [(1, 3, 4, 2), (2, 4, 6, 2), (2, 4, 9, 4)])
def test_visionzip_matches_its_description(batch, side, n_keep, contextual):
    from prunec.methods.visionzip import dominant_contextual
    from reference import slow_visionzip

    n = side * side
    q, k = _qk(batch, 2, 2, n + 1, seed=n_keep)
    features = torch.randn(batch, n, 5, generator=torch.Generator().manual_seed(side))
    index, merged = dominant_contextual(features, n_keep, [q], [k], [None], [0.4], False, contextual=contextual)
    probs = _slow_probs(q, k, 0.4, lambda b, i, j: True)
    for b in range(batch):
        cls = probs[b, :, 0].sum(dim=0)[1:].tolist()
        kept, values = slow_visionzip(features[b], cls, k[b].mean(dim=0)[1:], n_keep, contextual)
        assert index[b].tolist() == kept
        torch.testing.assert_close(merged[b].double(), torch.stack(values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch, seq, leading, n_keep", [(1, 9, 1, 6), (2, 17, 1, 9), (3, 14, 5, 7)])
def test_tome_merge_matches_its_description(batch, seq, leading, n_keep):
    from prunec.methods.tome import tome_merge
    from reference import slow_tome

    gen = torch.Generator().manual_seed(seq)
    hidden, keys = torch.randn(batch, seq, 6, generator=gen), torch.randn(batch, 2, seq, 4, generator=gen)
    size = torch.randint(1, 4, (batch, seq), generator=gen).float()
    candidates = torch.arange(seq)[None, :].expand(batch, -1) >= leading
    index, merged, new_size = tome_merge(hidden, size, keys, candidates, n_keep)
    for b in range(batch):
        kept, values, sizes = slow_tome(hidden[b], size[b].tolist(), keys[b].mean(dim=0), leading, n_keep)
        assert index[b].tolist() == kept
        torch.testing.assert_close(merged[b, kept].double(), torch.stack(values), atol=1e-6, rtol=0)
        assert new_size[b, kept].tolist() == sizes


def test_tome_reference_needs_proportional_attention(built_presets):
    """The ToMe preset's comparison is sensitive to proportional attention: without the log(size)
    bias the reference disagrees with the emitted module."""
    plan, module = built_presets(REPO / "specs" / "tome.yaml")
    hf = _hf(plan)
    layers = dict(hf.named_modules())[plan.adapter.domains()["vision"].layers_path.removeprefix("hf.")]
    stages = [dict(s, proportional_attention=False) for s in reference_stages(plan)]
    reference = VisionStagesReference(hf, layers, stages, plan.adapter.leading_tokens(), interpolate=True)
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(module(pixels), reference(pixels), atol=1e-4)


@pytest.mark.parametrize("fusion, normalize", [("weighted_sum", "sum"), ("weighted_sum", "minmax"),
                                               ("weighted_sum", "none"), ("rank", "sum")])
def test_fusion_matches_its_definition(fusion, normalize):
    gen = torch.Generator().manual_seed(3)
    batch, seq = 3, 15
    candidates = _candidates(batch, seq, [(2, 9), (0, 15), (4, 6)])
    scores = [torch.rand(batch, seq, generator=gen), torch.randint(0, 4, (batch, seq), generator=gen).float()]
    weights = [0.7, 0.3]
    actual = fuse_scores(scores, candidates, weights, fusion, normalize)
    for b in range(batch):
        cands = candidates[b].nonzero().flatten().tolist()
        expected = fuse_rows([[float(s[b, c]) for c in cands] for s in scores], weights, fusion, normalize)
        torch.testing.assert_close(actual[b, cands].double(), torch.tensor(expected, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        assert actual[b, ~candidates[b]].abs().sum() == 0


def test_rank_fusion_breaks_ties_by_the_lower_index():
    assert slow_ranks([1.0, 3.0, 3.0, 0.5]) == [2, 0, 1, 3]
    candidates = torch.ones(1, 4, dtype=torch.bool)
    fused = fuse_scores([torch.tensor([[1.0, 3.0, 3.0, 0.5]])], candidates, [1.0], "rank", "sum")
    assert fused.tolist() == [[-2.0, 0.0, -1.0, -3.0]]


# -- presets: validate, build, equal a hook reference -------------------------------------------


def _hf(plan):
    return load_model(plan.lock["model"], plan.spec.base_dir)


@pytest.fixture(scope="module")
def built_presets(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    cache = {}

    def get(path: Path):
        if path not in cache:
            # every preset's rewritten graph: each node's fake value must equal a fresh fake-tensor
            # propagation, checked by the compiler before `verify` (prunec/compiler.py)
            os.environ["PRUNEC_CHECK_META"] = "1"
            try:
                artifact = prunec.build(path, root / path.stem)
            finally:
                del os.environ["PRUNEC_CHECK_META"]
            cache[path] = (prunec.plan(path), prunec.load(artifact))
        return cache[path]
    return get


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_matches_hook_reference(built_presets, preset, pads):
    plan, module = built_presets(preset)
    family = plan.adapter.family
    if family == "vit":
        return _check_vision_preset(plan, module, batch=len(pads))
    reference = HookReference(_hf(plan), reference_stages(plan))
    seq_len = plan.lock["inputs"]["seq_len"]
    dropped = sum(s.n_candidates - s.n_keep for s in plan.stages)
    if family == "llava":
        ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=seq_len, seed=11 + len(pads),
                                         images=plan.lock["inputs"].get("images", 1))
        with torch.no_grad():
            actual = module(ids, mask, pixels)
        expected = reference(ids, mask, pixels)
        assert actual.shape[1] == seq_len - dropped
        return assert_close_on_real_tokens(actual, expected, pads, 1e-5)
    assert family == "llama", family
    ids, mask = llama_inputs(pads, seq_len, seed=11 + len(pads))
    with torch.no_grad():
        actual = module(ids, mask)
    expected = reference(ids, mask)
    assert actual.shape[1] == seq_len - dropped
    assert_close_on_kept_real_tokens(actual, expected, mask, reference.final_tokens)


def _vision_rule(stage: dict, leading: int) -> dict:
    """How the reference picks at a ViT site, from each method's formula (slow_* in reference.py)."""
    from reference import slow_fopru_rows, slow_hiprune, slow_received, slow_zero_tprune_si

    kind, layer, n_keep = stage["kind"], stage["layer"], stage["n_keep"]
    if kind in ("tome", "flowcut"):
        return {}
    if kind == "zero_tprune":
        return {"score": lambda probs, b: slow_pagerank(probs[layer][b], [1.0 / probs[layer].shape[-1]]
                                                        * probs[layer].shape[-1], stage["iterations"])}
    if kind == "fastervlm":  # the site layer's [CLS] row, head mean
        return {"score": lambda probs, b: probs[layer][b, :, 0].mean(0).tolist()}
    if kind == "vtc_cls":  # [CLS] rows summed over start_layer .. site
        return {"score": lambda probs, b: sum(probs[i][b, :, 0].double().mean(0)
                                              for i in range(stage["start_layer"], layer + 1)).tolist()}
    if kind == "zero_tprune_si":
        return {"select": lambda probs, keys, b: slow_zero_tprune_si(
            probs[layer][b], keys[layer][b], leading, n_keep, stage["iterations"], stage["similarity_share"])}
    if kind == "hiprune":
        return {"select": lambda probs, keys, b: slow_hiprune(slow_received(probs[stage["object_layer"]][b])[leading:],
                                                        slow_received(probs[layer][b])[leading:], n_keep,
                                                        stage["alpha"])}
    assert kind == "fopru", kind
    if stage["strategy"] == "row":
        return {"select": lambda probs, keys, b: slow_fopru_rows(slow_received(probs[layer][b])[leading:], n_keep)}
    return {"score": lambda probs, b: slow_received(probs[layer][b])}


def _check_vision_preset(plan, module, batch: int):
    hf = _hf(plan)
    layers = dict(hf.named_modules())[plan.adapter.domains()["vision"].layers_path.removeprefix("hf.")]
    leading = plan.adapter.leading_tokens()
    stages = [dict(s, **_vision_rule(s, leading)) for s in reference_stages(plan)]
    reference = VisionStagesReference(hf, layers, stages, leading, interpolate=True)
    pixels = torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        torch.testing.assert_close(module(pixels), reference(pixels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["aim", "todre", "tome", "hiprune", "holov"])
def test_keep_maps_trace_every_selection_kind(built_presets, name):
    """Keep-maps find each stage's keep indices, whatever op made them (merge ops return tuples)."""
    from prunec.viz import kept_patches, record_selections

    plan, module = built_presets(REPO / "specs" / f"{name}.yaml")
    from prunec.compiler import example_shape

    inputs = plan.adapter.example_inputs(example_shape(plan), 0)
    selections = record_selections(module, inputs)
    assert len(selections) == len(plan.stages)
    assert [len(k) for k in kept_patches(plan, inputs, selections)] == [s.n_keep for s in plan.stages]


def test_transprune_terms_select_differently(built_presets):
    """On these inputs IGA alone keeps other tokens than TTV (+ IGA): the reference is sensitive to
    which score runs. (On random weights TTV dominates the sum-normalized fusion: early tokens get
    less-averaged attention outputs, hence larger norm ratios; the IGA-only specs below check IGA.)"""
    plan, _ = built_presets(REPO / "specs" / "transprune-high.yaml")
    kept = []
    for weights in ([0.5, 0.5], [0.0, 1.0]):
        stages = reference_stages(plan)
        for stage in stages:
            stage["terms"] = [dict(t, weight=w) for t, w in zip(stage["terms"], weights)]
        reference = HookReference(_hf(plan), stages)
        ids, mask, pixels = llava_inputs(reference.model.config, [0, 2, 5], seq_len=40, seed=14)
        reference(ids, mask, pixels)
        kept.append(reference.kept)
    assert kept[0] != kept[1]


VIT_SITE_SPECS = {
    "fastervlm": ["{site: 'vision.layers[1]', method: fastervlm, keep: {count: 8}}"],
    "vtc-cls": ["{site: 'vision.layers[2]', method: vtc_cls, params: {start_layer: 0}, keep: {count: 7}}"],
    "hiprune": ["{site: 'vision.layers[2]', method: hiprune, params: {object_layer: 0, alpha: 0.8}, keep: {count: 8}}"],
    "fopru-row-then-rank": ["{site: 'vision.layers[0]', method: fopru, params: {strategy: row}, keep: {count: 10}}",
                            "{site: 'vision.layers[2]', method: fopru, keep: {count: 5}}"],
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", sorted(VIT_SITE_SPECS))
def test_vit_site_forms_match_hook_reference(build, name, batch):
    """FasterVLM, VTC-CLS, HiPrune and FoPru inside a ViT (their pre-LLM forms are the presets)."""
    stages = "\n".join(f"  - {stage}" for stage in VIT_SITE_SPECS[name])
    plan, module, _ = build(f"prunec: 1\nname: vit-{name}\nmodel: {{builtin: tiny-vit}}\ninputs: {{batch: 2}}\n"
                            f"pipeline:\n{stages}\n")
    _check_vision_preset(plan, module, batch)


SCORE_SPECS = {
    "hiprune-with-anchors": """
        pipeline:
          - {site: projector.output, method: hiprune, params: {object_layer: 0, alpha: 0.8}, keep: {count: 10}}
    """,
    "fopru-rank-then-lazyllm": """
        pipeline:
          - {site: projector.output, method: fopru, params: {strategy: rank}, keep: {count: 7}}
          - {site: "llm.layers[1]", method: lazyllm, keep: {count: 4}}
    """,
    "recoverable-half-by-cls": """
        pipeline:
          - {site: projector.output, method: recoverable, params: {visual_share: 0.5}, keep: {count: 8}}
    """,
    "recoverable-head-mean-lof": """
        pipeline:
          - {site: projector.output, method: recoverable, params: {heads: mean, neighbours: 4}, keep: {count: 8}}
    """,
    "vflowopt-then-in-llm": """
        pipeline:
          - {site: projector.output, method: vflowopt, action: merge, params: {threshold: 1.1, cell: 2},
             keep: {count: 10}}
          - {site: "llm.layers[0, 2]", method: vflowopt_llm, keep: {count: [7, 4]}}
    """,
    "vflowopt-with-pixel-entropy": """
        pipeline:
          - {site: projector.output, method: vflowopt, action: merge,
             params: {threshold: 1.1, cell: 2, entropy_weight: 0.5}, keep: {count: 10}}
          - {site: "llm.layers[1]", method: vflowopt_llm, keep: {count: 5}}
    """,
    "iga": """
        pipeline:
          - {site: "llm.layers[0, 2]", method: iga, keep: {count: [9, 4]}}
    """,
    "ttv-abs-accumulated-keep-original": """
        pipeline:
          - {site: "llm.layers[1, 2]", method: ttv, params: {accumulate_from: 0, cos: abs},
             keep: {count: [10, 5]}, positions: keep_original}
    """,
    "fastv-then-fused-iga-pyramiddrop-minmax": """
        pipeline:
          - {site: "llm.layers[0]", method: fastv, keep: {count: 12}}
          - site: "llm.layers[2]"
            method: fuse
            params:
              normalize: minmax
              terms: [{method: iga, weight: 2}, {method: pyramiddrop, weight: 1}]
            keep: {count: 5}
    """,
}


@pytest.mark.parametrize("pads", [[0], [0, 2, 5]], ids=["batch1", "batch3-left-padded"])
@pytest.mark.parametrize("name", sorted(SCORE_SPECS))
def test_scores_match_hook_reference(build, name, pads):
    plan, module, _ = build(f"""
        prunec: 1
        name: {name}
        model: {{builtin: tiny-llava}}
        inputs: {{batch: 2, seq_len: 30}}
    """ + SCORE_SPECS[name])
    reference = HookReference(_hf(plan), reference_stages(plan))
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=30, seed=3 + len(pads))
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    assert_close_on_real_tokens(actual, reference(ids, mask, pixels), pads, 1e-5)


def test_rank_fusion_of_fastervlm_and_divprune_composes_in_yaml(build):
    """FasterVLM's [CLS] score and DivPrune's diversity order, rank-fused, from YAML alone."""
    plan, module, _ = build("""
        prunec: 1
        name: cls-diversity-rank
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - site: projector.output
            method: fuse
            params:
              fusion: rank
              terms: [{method: fastervlm, weight: 1}, {method: divprune, weight: 1}]
            keep: {count: 6}
    """)
    reference = HookReference(_hf(plan), reference_stages(plan))
    pads = [0, 3]
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=30, seed=5)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    assert_close_on_real_tokens(actual, reference(ids, mask, pixels), pads, 1e-5)
    # the fusion differs from either term alone on these inputs
    alone = [HookReference(_hf(plan), [dict(reference_stages(plan)[0], kind=k)]) for k in ("fastervlm", "divprune")]
    fused_kept = reference.kept
    for ref in alone:
        ref(ids, mask, pixels)
        assert ref.kept != fused_kept


@pytest.mark.parametrize("batch, seq, spans", [(1, 12, [(2, 7)]), (3, 16, [(1, 9), (3, 12), (0, 14)])])
def test_sparsevlm_raters_match_their_formula(batch, seq, spans):
    from prunec.methods.sparsevlm import text_raters

    embeds = torch.randn(batch, seq, 6, generator=torch.Generator().manual_seed(seq))
    candidates = _candidates(batch, seq, spans)
    raters = text_raters(embeds, candidates)
    for b, (start, stop) in enumerate(spans):
        text = list(range(stop, seq))
        relevance = [0.0] * len(text)
        for v in range(start, stop):
            logits = [float(embeds[b, v].double() @ embeds[b, t].double()) for t in text]
            total = sum(math.exp(x) for x in logits)
            relevance = [r + math.exp(x) / total / (stop - start) for r, x in zip(relevance, logits)]
        mean = sum(relevance) / len(relevance)
        assert raters[b].nonzero().flatten().tolist() == [t for t, r in zip(text, relevance) if r > mean]


@pytest.mark.parametrize("batch, n, n_keep, clusters, ratio", [(1, 16, 8, 1, 0.3), (2, 30, 10, 3, 0.5), (3, 12, 4, 2, 1.0)])
def test_sparsevlm_recycling_matches_its_description(batch, n, n_keep, clusters, ratio):
    from prunec.methods.sparsevlm import recycle_merge
    from reference import slow_recycle

    gen = torch.Generator().manual_seed(n)
    features, scores = torch.randn(batch, n, 6, generator=gen), torch.rand(batch, n, generator=gen)
    index, merged = recycle_merge(features, scores, n_keep, clusters=clusters, ratio=ratio, neighbours=3)
    for b in range(batch):
        kept, values = slow_recycle(features[b], scores[b].tolist(), n_keep, clusters, ratio, 3)
        assert index[b].tolist() == kept
        torch.testing.assert_close(merged[b].double(), torch.stack(values), atol=1e-6, rtol=0)


def test_methods_command_lists_every_method():
    from typer.testing import CliRunner

    from prunec.cli import app

    listed = json.loads(CliRunner().invoke(app, ["methods", "--json"]).output)
    assert [row["method"] for row in listed] == method_names()
    assert all(row["source"] for row in listed)


def test_every_method_is_registered_with_a_source_and_schema():
    for name in method_names():
        info = get_method(name)
        assert info.source and info.summary and info.params_schema["type"] == "object"
        assert set(info.defaults) <= set(info.params_schema.get("properties", {}))


def test_vision_attention_methods_find_a_dinov2_towers_layers(tmp_path):
    """LLaVA with a DINOv2 tower (`encoder.layer.N`, not CLIP's `encoder.layers.N`): FasterVLM
    reads the feature layer's [CLS] row and keeps what a direct computation keeps."""
    from prunec.adapters.base import ExampleShape
    from prunec.models import BUILTIN_CONFIGS
    from prunec.viz import record_selections

    config = dict(BUILTIN_CONFIGS["tiny-llava"])
    config["vision_config"] = dict(model_type="dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, image_size=28, patch_size=7)
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = tmp_path / "spec.yaml"
    spec.write_text("prunec: 1\nname: dinov2-llava\nmodel: {config: config.json}\ninputs: {batch: 2, seq_len: 40}\n"
                    "pipeline:\n  - {site: projector.output, method: fastervlm, keep: {count: 6}}\n")
    plan = prunec.plan(spec)
    module = prunec.load(prunec.build(spec, tmp_path / "out"))
    inputs = plan.adapter.example_inputs(ExampleShape(2, 40, None), 0)
    (kept,) = record_selections(module, inputs)
    hf = _hf(plan)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = hf.model.vision_tower(inputs[2], output_attentions=True).attentions
    cls_row = attentions[plan.adapter.vision_feature_layer()][:, :, 0, 1:].mean(dim=1)  # heads, patches
    n_image = plan.adapter.image_tokens_per_image()
    for b in range(2):
        start = int((inputs[0][b] == plan.adapter.config.image_token_id).nonzero()[0])
        patches = [i - start for i in kept[b].tolist() if start <= i < start + n_image]
        assert patches == sorted(slow_topk(cls_row[b].tolist(), 6))


CATP_ICL = """
    prunec: 1
    name: catp-icl
    model: {builtin: tiny-llava}
    inputs: {batch: 2, seq_len: 80, images: 3}
    pipeline:
      - {site: projector.output, method: catp, keep: {ratio: 0.625}}
      - {site: "llm.layers[1]", method: catp_context, keep: {ratio: 0.375}}
      - {site: "llm.layers[2]", method: catp_query, keep: {ratio: 0.375}}
"""


@pytest.mark.parametrize("pads", [[0], [0, 3, 7]], ids=["batch1", "batch3-left-padded"])
def test_catp_both_stages_on_multi_image_rows_match_hook_reference(build, pads):
    """Three images per row (two demonstrations + a query): stage 1 per image with its own paired
    text, stage 2 over the demonstrations at layer 1 and the query image at layer 2."""
    plan, module, _ = build(CATP_ICL)
    assert [s.n_keep for s in plan.stages] == [30, 22, 18]  # 10 per image; 12 + 10; 12 + 6
    reference = HookReference(_hf(plan), reference_stages(plan))
    ids, mask, pixels = llava_inputs(reference.model.config, pads, seq_len=80, seed=21 + len(pads), images=3)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    expected = reference(ids, mask, pixels)
    assert actual.shape[1] == 80 - 30
    assert_close_on_real_tokens(actual, expected, pads, 1e-5)
    per_image = [sorted(p // 16 for p in kept) for kept in reference.kept]  # row 0's images after each stage
    assert [per_image[0].count(m) for m in range(3)] == [10, 10, 10]
    assert per_image[1].count(2) == 10 and per_image[2].count(2) == 6  # the query image: untouched, then 6


@pytest.mark.parametrize("batch, heads, kv_heads, seq", [(1, 2, 2, 20), (3, 4, 2, 26)])
def test_catp_stage2_scores_match_their_formulas(batch, heads, kv_heads, seq):
    """Scores on a causal, left-padded batch with three 3-token images per row, against loop-built
    head-mean attention rows of the last token and means written out token by token."""
    from prunec.methods.catp import context_scores, query_scores

    gen = torch.Generator().manual_seed(seq)
    layers = [_qk(batch, heads, kv_heads, seq, seed) for seed in (7, 8)]
    hidden = torch.randn(batch, seq, 6, generator=gen)
    pads = [0, 2, 5][:batch]
    allowed = lambda b, i, j: j <= i and j >= pads[b]  # noqa: E731
    probs = [_slow_probs(q, k, 0.35, allowed) for q, k in layers]
    masks = torch.tensor([[[[allowed(b, i, j) for j in range(seq)] for i in range(seq)]] for b in range(batch)])
    starts = [[pads[b] + 2 + 5 * m + b for m in range(3)] for b in range(batch)]  # 3 tokens, then 2 of text
    positions = torch.tensor([[s + t for s in row for t in range(3)] for row in starts])
    valid = torch.tensor([[t >= pads[b] for t in range(seq)] for b in range(batch)])
    qs, ks = [q for q, _ in layers], [k for _, k in layers]
    context = context_scores(hidden, positions, 3, valid, qs, ks, [masks, masks], [0.35, 0.35], False, similarity=0.6)
    query = query_scores(hidden, positions, 3, valid, [], [], [], [], False)
    for b in range(batch):
        h = hidden[b].double()
        sample = h[starts[b][2]:].mean(dim=0)  # the query image's first token to the end (all real)
        demos = h[positions[b, :6]].mean(dim=0)
        for c in positions[b, :6].tolist():
            growth = max(0.0, float(probs[1][b, :, -1, c].mean() - probs[0][b, :, -1, c].mean()))
            expected = growth + 0.6 * float(torch.nn.functional.cosine_similarity(h[c], sample, dim=0))
            assert abs(float(context[b, c]) - expected) < 1e-5
        for c in positions[b, 6:].tolist():
            expected = float(torch.nn.functional.cosine_similarity(h[c], demos, dim=0))
            assert abs(float(query[b, c]) - expected) < 1e-5


def test_vflowopt_patch_entropy_matches_its_description():
    from prunec.methods.vflowopt import patch_entropy
    from reference import slow_patch_entropy

    pixels = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 0.8  # negatives wrap
    pixels[1, :, :6, :6] = 0.25  # a flat patch: entropy 0
    entropy = patch_entropy(pixels, 4)
    for b in range(2):
        torch.testing.assert_close(entropy[b].double(), torch.tensor(slow_patch_entropy(pixels[b], 4),
                                                                     dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(entropy[1, 0]) < 1e-6 < float(entropy[0].min())

