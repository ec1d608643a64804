"""Prefill FLOPs estimate (METHODS.md section 0.4).

Per layer, for n tokens, hidden d and FFN width m: F(n) = 4 n d^2 + 2 n^2 d + k n d m, with k = 3 for
SwiGLU FFNs (Llama) and 2 for two-matrix MLPs (ViT, CLIP, BERT). Multiply-accumulates, full MHA
projections (GQA's smaller K/V projections are not discounted), counted over the whole sequence
(convention (a): system + image + text), for the transformer layers only (no embeddings, head,
norms, vision tower of a VLM or projector).
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import Plan

CONVENTION = "MACs, full sequence (convention a), 4nd^2 + 2n^2d + k*ndm per layer, transformer layers only"


def layer_macs(n: int, d: int, m: int, ffn_matrices: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m


@dataclass(frozen=True)
class Segment:
    domain: str
    first_layer: int
    last_layer: int      # inclusive
    tokens: int
    macs: int


def segments(plan: Plan) -> list[Segment]:
    """Runs of consecutive layers that see the same sequence length, per domain."""
    inputs, adapter = plan.lock["inputs"], plan.adapter
    out = []
    for name, domain in adapter.domains().items():
        d, m, k = adapter.layer_dims(name)
        n = adapter.tokens_at_input(name, inputs)
        lengths = []
        cuts = {s.layer: s.n_candidates - s.n_keep for s in plan.stages if s.domain == name and s.layer is not None}
        n -= sum(s.n_candidates - s.n_keep for s in plan.stages
                 if s.domain == name and s.layer is None and s.site == "projector.output")
        for layer in range(domain.num_layers):
            lengths.append(n)
            n -= cuts.get(layer, 0)
        start = 0
        for layer in range(1, domain.num_layers + 1):
            if layer == domain.num_layers or lengths[layer] != lengths[start]:
                macs = sum(layer_macs(lengths[i], d, m, k) for i in range(start, layer))
                out.append(Segment(name, start, layer - 1, lengths[start], macs))
                start = layer
    return out


def estimate(plan: Plan) -> dict:
    inputs, adapter = plan.lock["inputs"], plan.adapter
    baseline = 0
    for name, domain in adapter.domains().items():
        d, m, k = adapter.layer_dims(name)
        baseline += domain.num_layers * layer_macs(adapter.tokens_at_input(name, inputs), d, m, k)
    pruned = sum(s.macs for s in segments(plan))
    return {
        "convention": CONVENTION,
        "baseline_macs": baseline,
        "pruned_macs": pruned,
        "ratio": round(pruned / baseline, 6) if baseline else 1.0,
        "segments": [
            {"domain": s.domain, "layers": [s.first_layer, s.last_layer], "tokens": s.tokens, "macs": s.macs}
            for s in segments(plan)
        ],
    }


def layer_tokens(plan: Plan) -> list[tuple[int, int]]:
    """(tokens, candidate tokens) each layer of the pruned domain sees, in layer order."""
    out = []
    for seg in segments(plan):
        candidates = _candidates_at(plan, seg)
        out.extend([(seg.tokens, candidates)] * (seg.last_layer - seg.first_layer + 1))
    return out


def _candidates_at(plan: Plan, seg) -> int:
    count = None
    for stage in plan.stages:
        if stage.domain == seg.domain:
            count = stage.n_candidates if count is None else count
            if stage.layer is None or stage.layer < seg.first_layer:
                count = stage.n_keep
    if count is None and plan.adapter.span is None:
        return 0
    if count is None:
        return plan.adapter.initial_candidates_from_config(plan.lock["inputs"], plan.adapter.protectable)
    return count
