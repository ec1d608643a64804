"""FLOPs accounting for a plan (METHODS.md section 0.4), always reported with its convention.

Three views of the same per-layer token counts:

- **Paper style** (FastV's formula, multiply-accumulates): per layer F(n) = 4nd^2 + 2n^2d + k*ndm,
  full MHA projections, transformer layers only. Two token conventions, (a) `full`: n = the whole
  sequence (FastV, DivPrune) and (b) `image`: n = the candidate (image / patch) tokens only (PDrop,
  CATP, TransPrune); two FFN terms, k = 2 (FastV) or 3 (SwiGLU, PDrop). All four are reported.
- **Exact**: FLOPs = 2 x MACs, grouped-query K/V projections at their real width, every layer of
  every domain plus the parts pruning never touches (a VLM's vision tower and projector), so the
  ratio is the end-to-end prefill ratio of the matmuls.
- **Decode**: R new tokens after the prefill, with the KV cache each layer kept; per layer
  R(2d^2 + 2d*d_kv + k*dm) + 2 d_attn sum_{i=1..R}(n + i) MACs. Pruning shrinks only the attention term.

Softmax, norms, RoPE, embeddings and the LM head are not counted in any view.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import schedule
from .spec import Plan

DECODE_TOKENS = 100  # the decode length METHODS.md 0.4 (6) cites
PAPER = "MACs of the transformer layers, 4nd^2 + 2n^2d + k*ndm per layer (full MHA)"
EXACT = ("FLOPs = 2 x MACs; GQA-aware K/V projections; attention QK^T and AV over the whole square; "
         "vision tower and projector included; softmax, norms, RoPE, embeddings and LM head excluded")
CONVENTION = "paper style: full sequence (convention a), k = the model's FFN matrices"


def layer_macs(n: int, d: int, m: int, ffn_matrices: int) -> int:
    """FastV's per-layer prefill cost, in MACs, for n tokens."""
    return 4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m


def exact_layer_macs(n: int, d: int, m: int, ffn_matrices: int, d_attn: int, d_kv: int) -> int:
    """Q and O projections d -> d_attn -> d, K and V d -> d_kv, QK^T and AV, FFN."""
    return 2 * n * d * d_attn + 2 * n * d * d_kv + 2 * n * n * d_attn + ffn_matrices * n * d * m


def decode_layer_macs(prefix: int, new_tokens: int, d: int, m: int, ffn_matrices: int, d_attn: int, d_kv: int) -> int:
    per_token = 2 * d * d_attn + 2 * d * d_kv + ffn_matrices * d * m
    attended = new_tokens * prefix + new_tokens * (new_tokens + 1) // 2  # sum_{i=1..R} (prefix + i)
    return new_tokens * per_token + 2 * d_attn * attended


@dataclass(frozen=True)
class Segment:
    domain: str
    first_layer: int
    last_layer: int      # inclusive
    tokens: int
    macs: int


def domain_input(plan: Plan, name: str) -> tuple[int, int]:
    """(tokens, candidate tokens) domain `name` receives from the model's inputs (`schedule`)."""
    return schedule.domain_input(plan, name)


def domain_lengths(plan: Plan, name: str) -> list[tuple[int, int]]:
    """(tokens, candidate tokens) that each layer of domain `name` sees (`schedule.layer_tokens`)."""
    return schedule.layer_tokens(plan, name)


def segments(plan: Plan) -> list[Segment]:
    """Runs of consecutive layers that see the same sequence length, per domain (paper-style MACs)."""
    out = []
    for name in plan.adapter.domains():
        d, m, k = plan.adapter.layer_dims(name)
        lengths = [tokens for tokens, _ in domain_lengths(plan, name)]
        start = 0
        for layer in range(1, len(lengths) + 1):
            if layer == len(lengths) or lengths[layer] != lengths[start]:
                macs = sum(layer_macs(n, d, m, k) for n in lengths[start:layer])
                out.append(Segment(name, start, layer - 1, lengths[start], macs))
                start = layer
    return out


def _paper_style(plan: Plan, tokens: str, ffn: int) -> dict | None:
    baseline = pruned = 0
    for name in plan.adapter.domains():
        d, m, _ = plan.adapter.layer_dims(name)
        lengths = domain_lengths(plan, name)
        column = 0 if tokens == "full" else 1
        full = domain_input(plan, name)[column]
        if column == 1 and (full == 0 or not plan.adapter.needs_image):
            return None  # no image tokens: convention (b) does not apply
        baseline += len(lengths) * layer_macs(full, d, m, ffn)
        pruned += sum(layer_macs(row[column], d, m, ffn) for row in lengths)
    return {"tokens": tokens, "ffn": f"{ffn}ndm", "baseline_macs": baseline, "pruned_macs": pruned,
            "ratio": round(pruned / baseline, 6) if baseline else 1.0}


def _exact(plan: Plan, new_tokens: int) -> dict:
    adapter, inputs = plan.adapter, plan.lock["inputs"]
    fixed = adapter.fixed_macs(inputs)
    prefill = {"baseline": 0, "pruned": 0}
    decode = {"baseline": 0, "pruned": 0}
    kv_entries = {"baseline": 0, "pruned": 0}
    for name in adapter.domains():
        d, m, k = adapter.layer_dims(name)
        d_attn, d_kv = adapter.attention_dims(name)
        lengths = [tokens for tokens, _ in domain_lengths(plan, name)]
        full = domain_input(plan, name)[0]
        prefill["baseline"] += len(lengths) * exact_layer_macs(full, d, m, k, d_attn, d_kv)
        prefill["pruned"] += sum(exact_layer_macs(n, d, m, k, d_attn, d_kv) for n in lengths)
        if adapter.generates:
            decode["baseline"] += len(lengths) * decode_layer_macs(full, new_tokens, d, m, k, d_attn, d_kv)
            decode["pruned"] += sum(decode_layer_macs(n, new_tokens, d, m, k, d_attn, d_kv) for n in lengths)
            kv_entries["baseline"] += len(lengths) * full
            kv_entries["pruned"] += sum(lengths)
    fixed_total = sum(fixed.values())
    scoring = _scoring_macs(plan)
    out = {
        "convention": EXACT,
        "prefill_flops": {"baseline": 2 * (prefill["baseline"] + fixed_total),
                          "pruned": 2 * (prefill["pruned"] + fixed_total)},
        "unpruned_parts_flops": {part: 2 * macs for part, macs in fixed.items()},
        "scoring_flops": 2 * scoring,
    }
    out["prefill_flops"]["ratio"] = _ratio(out["prefill_flops"])
    if adapter.generates:
        out["decode"] = {"new_tokens": new_tokens, "baseline": 2 * decode["baseline"], "pruned": 2 * decode["pruned"]}
        out["decode"]["ratio"] = _ratio(out["decode"])
        out["kv_cache_tokens"] = {"per_row_summed_over_layers": kv_entries,
                                  "ratio": _ratio({"baseline": kv_entries["baseline"], "pruned": kv_entries["pruned"]})}
    return out


def _scoring_macs(plan: Plan) -> int:
    """Work a method recomputes outside the model's own layers (not in `pruned`), per stage:
    next_layer_qk: the next layer's K for every token, Q for the last one, one attention row;
    instruction_qk: K and Q for every token, and rows for every non-candidate token (an upper bound
    on the instruction rows); text_raters: attention rows for every non-candidate token (an upper
    bound on the raters); layer_attention at a layer site: Q K^T for each layer read (each layer
    once across the stages of an accumulating method). Per-token statistics (TTV norms, cosines) and the
    vision-side maps of pre-LLM methods are not counted (the latter are O(vision tokens^2 d))."""
    from .methods import get_method, stage_signals, terms

    total = 0
    summed_through: dict[tuple[str, str], int] = {}
    for stage in plan.stages:
        signals = stage_signals(stage.method, stage.param_dict)
        d, _, _ = plan.adapter.layer_dims(stage.domain)
        d_attn, d_kv = plan.adapter.attention_dims(stage.domain)
        if stage.layer is None:
            continue
        lengths = domain_lengths(plan, stage.domain)
        n = lengths[stage.layer][0]
        if "next_layer_qk" in signals:
            total += n * d * d_kv + d * d_attn + 2 * n * d_attn
        if "instruction_qk" in signals:
            total += n * d * d_kv + n * d * d_attn + 2 * (n - stage.n_candidates) * n * d_attn
        if "text_raters" in signals:
            total += 2 * (n - stage.n_candidates) * n * d_attn
        for method, params, _ in terms(stage.method, stage.param_dict):
            info = get_method(method)
            if "layer_attention" not in info.signals:
                continue
            first = stage.layer
            if info.accumulates:
                key = (stage.domain, method)
                first = max(params.get("accumulate_from", stage.layer), summed_through.get(key, -1) + 1)
                summed_through[key] = stage.layer
            total += sum(lengths[layer][0] ** 2 * d_attn for layer in range(first, stage.layer + 1))
    return total


def _ratio(pair: dict) -> float:
    return round(pair["pruned"] / pair["baseline"], 6) if pair["baseline"] else 1.0


def estimate(plan: Plan, new_tokens: int = DECODE_TOKENS) -> dict:
    """Every view, per row of the spec's example inputs. `ratio` is the default (paper style, full
    sequence, the model's own FFN matrices) that `explain` prints first."""
    ffn_own = {plan.adapter.layer_dims(name)[2] for name in plan.adapter.domains()}
    views = [v for v in (_paper_style(plan, tokens, ffn) for tokens in ("full", "image") for ffn in (2, 3))
             if v is not None]
    default = next(v for v in views if v["tokens"] == "full" and int(v["ffn"][0]) in ffn_own)
    return {
        "convention": f"{PAPER}; default: full sequence (convention a), {default['ffn']}",
        "baseline_macs": default["baseline_macs"],
        "pruned_macs": default["pruned_macs"],
        "ratio": default["ratio"],
        "paper_style": views,
        "layer_average_candidates": layer_average_candidates(plan),
        "exact": _exact(plan, new_tokens),
        "segments": [
            {"domain": s.domain, "layers": [s.first_layer, s.last_layer], "tokens": s.tokens, "macs": s.macs}
            for s in segments(plan)
        ],
    }


def layer_average_candidates(plan: Plan) -> dict[str, float]:
    """Candidate (image / patch / text) tokens per layer, averaged over each domain's layers: the
    "keep N" of in-LLM papers (SparseVLM's 192 = 2x576, 4x300, 10x200, 16x110 over 32 layers)."""
    out = {}
    for name in plan.adapter.domains():
        lengths = domain_lengths(plan, name)
        out[name] = round(sum(c for _, c in lengths) / len(lengths), 2)
    return out


def layer_tokens(plan: Plan) -> list[tuple[int, int]]:
    """(tokens, candidate tokens) each layer of the first domain sees, in layer order."""
    return domain_lengths(plan, next(iter(plan.adapter.domains())))
