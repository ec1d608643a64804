"""Text-token pruning in BERT encoders, against HF BERT run with forward hooks doing the same
selection (tests/reference.py), at batch 1 and at batch 3 with right padding, per-token and pooled."""
from __future__ import annotations

import pytest
import torch

from reference import EncoderStagesReference, reference_stages, slow_divprune, slow_pagerank, slow_topk

from prunec.models import load_model

SEQ = 20


def bert_inputs(pads: list[int], seed: int):
    """Right-padded text: row b ends with pads[b] pad tokens (id 0, masked); token 0 stands for [CLS]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(pads), SEQ), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    for b, pad in enumerate(pads):
        if pad:
            ids[b, -pad:] = 0
            mask[b, -pad:] = 0
    return ids, mask


def _spec(pooling: str, pipeline: str) -> str:
    return (f"prunec: 1\nname: bert-{pooling}\nmodel: {{builtin: tiny-bert}}\ninputs: {{batch: 2, seq_len: {SEQ}}}\n"
            f"output: {{pooling: {pooling}}}\npipeline:{pipeline}\n")


@pytest.mark.parametrize("pooling", ["none", "mean", "cls"])
def test_keep_everything_pools_like_sentence_transformers(build, pooling):
    """No stages: the HF encoder's output, mean-pooled over real tokens by the formula (or [CLS])."""
    plan, module, _ = build(_spec(pooling, " []"))
    ids, mask = bert_inputs([0, 4, 9], seed=1)
    with torch.no_grad():
        hidden = load_model(plan.lock["model"], plan.spec.base_dir)(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = module(ids, mask)
    expected = {"none": hidden, "cls": hidden[:, 0],
                "mean": torch.stack([hidden[b, :SEQ - pad].mean(dim=0) for b, pad in enumerate([0, 4, 9])])}[pooling]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


PIPELINE = """
  - {site: "encoder.layers[0]", method: fastervlm, keep: {count: 14}}
  - {site: "encoder.layers[1]", method: zero_tprune, params: {iterations: 5}, keep: {count: 9}}
  - {site: "encoder.layers[2]", method: divprune, keep: {count: 5}}"""


def _pick(stage: dict, leading: int):
    """Candidate-local picks from each method's formula: [CLS] row (head mean), PageRank started
    uniform over the real tokens, DivPrune's greedy max-min over the hidden states."""
    kind, layer, n_keep = stage["kind"], stage["layer"], stage["n_keep"]

    def cands(x, b):
        return x[b, leading:]

    if kind == "fastervlm":
        return lambda probs, hidden, real, b: slow_topk(cands(probs[layer][:, :, 0].mean(1), b).tolist(), n_keep)
    if kind == "zero_tprune":
        def pagerank(probs, hidden, real, b):
            start = [float(r) / float(real[b].sum()) for r in real[b]]
            return slow_topk(slow_pagerank(probs[layer][b], start, stage["iterations"])[leading:], n_keep)
        return pagerank
    assert kind == "divprune", kind
    return lambda probs, hidden, real, b: slow_divprune(cands(hidden, b), n_keep)


@pytest.mark.parametrize("pooling", ["none", "mean"])
@pytest.mark.parametrize("pads", [[0], [0, 4, 9]], ids=["batch1", "batch3-right-padded"])
def test_encoder_pruning_matches_hook_reference(build, pooling, pads):
    plan, module, _ = build(_spec(pooling, PIPELINE))
    stages = [dict(s, pick=_pick(s, leading=1)) for s in reference_stages(plan)]
    reference = EncoderStagesReference(load_model(plan.lock["model"], plan.spec.base_dir), stages, 1, pooling)
    ids, mask = bert_inputs(pads, seed=len(pads))
    with torch.no_grad():
        actual = module(ids, mask)
    expected = reference(ids, mask)
    if pooling == "none":
        assert actual.shape[1] == 1 + 5
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_padding_goes_first_and_the_pooled_mean_ignores_the_pads_that_survive(build):
    """Row 2 has 10 real candidates: a stage keeping 14 keeps all of them plus 4 pads, and the
    module's pooled mean counts only the real ones (the pads' share would move it)."""
    from prunec.viz import record_selections

    first_stage = PIPELINE.splitlines()[1]
    plan, module, _ = build(_spec("mean", "\n" + first_stage))
    ids, mask = bert_inputs([0, 4, 9], seed=5)
    kept = record_selections(module, (ids, mask))[0]
    assert kept[2].tolist() == list(range(15))  # [CLS], 10 real tokens, then the 4 lowest pads
    hf = load_model(plan.lock["model"], plan.spec.base_dir)
    stages = [dict(s, pick=_pick(s, leading=1)) for s in reference_stages(plan)]
    per_token = EncoderStagesReference(hf, stages, 1, "none")(ids, mask)
    with torch.no_grad():
        pooled = module(ids, mask)
    torch.testing.assert_close(pooled[2], per_token[2, :11].mean(dim=0), atol=1e-5, rtol=0)
    assert not torch.allclose(pooled[2], per_token[2].mean(dim=0), atol=1e-3)


def test_an_unprotected_cls_is_a_candidate_like_any_token(build):
    """`protect: []`: [CLS] competes with the words (20 candidates here, not 19)."""
    pipeline = ('\n  - {site: "encoder.layers[1]", method: zero_tprune, params: {iterations: 5}, keep: {count: 10}, '
                'protect: []}')
    plan, module, _ = build(_spec("mean", pipeline))
    assert plan.stages[0].n_candidates == SEQ
    stages = [dict(s, pick=_pick(s, leading=0)) for s in reference_stages(plan)]
    reference = EncoderStagesReference(load_model(plan.lock["model"], plan.spec.base_dir), stages, 0, "mean")
    ids, mask = bert_inputs([0, 4, 9], seed=7)
    with torch.no_grad():
        torch.testing.assert_close(module(ids, mask), reference(ids, mask), atol=1e-5, rtol=0)
