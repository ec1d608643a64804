"""The prunec custom ops: fake kernels agree with real ones, selections match slow definitions,
and the ops survive torch.export (covered by every build) and torch.compile."""
from __future__ import annotations

import pytest
import torch

import prunec.ops as ops
from prunec.methods.divprune import divprune_keep
from prunec.methods.fastv import attention_received
from reference import slow_divprune, slow_topk


def _candidates(batch, seq, n, gen):
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        mask[b, torch.randperm(seq, generator=gen)[:n]] = True
    return mask


@pytest.mark.parametrize("op,args", [
    ("select_topk", lambda g: (torch.randn(3, 11, generator=g), _candidates(3, 11, 6, g), 6, 2)),
    ("select_divprune", lambda g: (torch.randn(3, 11, 5, generator=g), _candidates(3, 11, 6, g), 6, 4)),
    ("gather_tokens", lambda g: (torch.randn(1, 2, 9, 9, generator=g), torch.tensor([[0, 3, 8], [1, 2, 5]]), [2, 3])),
    ("attention_received", lambda g: (torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g),
                                      None, 0.35, True, "last")),
    ("span_mask", lambda g: (torch.randn(2, 7, 3, generator=g), 1)),
])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.prunec, op).default, args(torch.Generator().manual_seed(0)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("batch,n,keep", [(1, 9, 3), (3, 16, 5), (2, 13, 13)])
def test_divprune_matches_slow_definition(batch, n, keep):
    features = torch.randn(batch, n, 6, generator=torch.Generator().manual_seed(n))
    got = divprune_keep(features, keep)
    for b in range(batch):
        assert got[b].tolist() == slow_divprune(features[b], keep)


def test_divprune_keeps_its_budget_of_distinct_tokens_when_only_duplicates_remain():
    """4 distinct tokens, each twice, budget 6: the first 4 picks are one copy of each (every other
    token is then at distance ~0), and the budget is filled with 6 distinct indices (the documented
    deviation: the official argmax would re-pick a chosen token)."""
    from prunec.methods.divprune import divprune_keep_order

    base = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    order = divprune_keep_order(torch.cat([base, base], dim=1), 6)[0].tolist()
    assert sorted(j % 4 for j in order[:4]) == [0, 1, 2, 3]
    assert len(set(order)) == 6


def test_second_smallest_is_kthvalue_2_with_repeated_minima():
    """DivPrune's first pick reads each column's second-smallest distance; two tokens at the same minimum
    distance (duplicates, or a column whose diagonal is not its smallest entry) keep the repeat."""
    from prunec.methods.divprune import second_smallest

    distance = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(3))
    distance[:, 4, 7] = distance[:, 9, 7] = -1.0  # column 7: minimum twice -> second smallest is -1
    distance[1, 2, 5] = -2.0
    expected = distance.kthvalue(2, dim=1).values
    assert second_smallest(distance)[:, 7].tolist() == [-1.0, -1.0]
    assert torch.equal(second_smallest(distance), expected)


def test_topk_breaks_ties_to_the_lower_index_and_keeps_non_candidates():
    scores = torch.tensor([[9.0, 1.0, 5.0, 5.0, 5.0, 0.0]])
    candidates = torch.tensor([[False, True, True, True, True, True]])
    kept = ops.select_topk(scores, candidates, 5, 2)
    assert kept.tolist() == [[0, 2, 3]]
    assert slow_topk([1.0, 5.0, 5.0, 5.0, 0.0], 2) == [1, 2]


def test_selection_rejects_rows_with_the_wrong_candidate_count():
    candidates = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(ValueError, match="built for 2 candidate tokens per row"):
        ops.select_topk(torch.randn(2, 3), candidates, 2, 1)


def test_attention_received_last_row_matches_explicit_softmax():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 6, 4, generator=gen), torch.randn(2, 3, 6, 4, generator=gen)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, :2] = False  # row 1 is left-padded by two tokens
    got = attention_received(q, k, mask, 0.5, False, "last")
    for b in range(2):
        logits = torch.einsum("hd,hsd->hs", q[b, :, -1], k[b]) * 0.5  # [heads, keys]
        logits[:, ~mask[b, 0, -1]] = float("-inf")
        torch.testing.assert_close(got[b], torch.softmax(logits, -1).mean(0))


def test_ops_survive_torch_compile():
    def prune(x, scores, candidates):
        index = torch.ops.prunec.select_topk(scores, candidates, 4, 2)
        return torch.ops.prunec.gather_tokens(x, index, [1]) * 2

    gen = torch.Generator().manual_seed(2)
    x, scores = torch.randn(2, 6, 3, generator=gen), torch.randn(2, 6, generator=gen)
    candidates = torch.tensor([[False, True, True, True, True, False]] * 2)
    compiled = torch.compile(prune, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, scores, candidates), prune(x, scores, candidates))


def test_attention_received_repeats_grouped_kv_heads():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    repeated = k.repeat_interleave(2, dim=1)
    for query in ("last", "all"):
        torch.testing.assert_close(attention_received(q, k, None, 0.3, True, query),
                                   attention_received(q, repeated, None, 0.3, True, query))


def test_attention_received_all_queries_is_the_mean_over_causal_rows():
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 4, 3, generator=gen), torch.randn(1, 2, 4, 3, generator=gen)
    got = attention_received(q, k, None, 1.0, True, "all")[0]
    expected = torch.zeros(4)
    for i in range(4):  # query i attends keys 0..i
        for h in range(2):
            expected[: i + 1] += torch.softmax(q[0, h, i] @ k[0, h, : i + 1].T, -1) / 2
    torch.testing.assert_close(got, expected / 4)
