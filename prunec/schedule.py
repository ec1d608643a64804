"""The token schedule: how many tokens and candidates each stage and each layer sees.

The one place that turns budgets into counts at the example inputs (`ratio_count`, with the stage's
rounding rule, the same `ragged.round_count` that run-time budgets apply per row) and
counts into per-stage and per-layer token numbers. Validation, FLOPs, `explain`, the manifest,
decoding, the capture's shortest sequence, `diff`, layer-averaged budgets and `eval --keep` all
read it, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ragged import round_count


def ratio_count(ratio: float, original: int, rounding: str) -> int:
    """Candidates a `ratio` budget keeps of `original`."""
    return round_count(ratio * original, rounding)


def method_rounding(method: str, params: dict) -> str:
    """The rule a method's official code uses; a fusion rounds as its terms do when they agree."""
    from .methods import get_method, terms

    info = get_method(method)
    if info.kind != "fusion":
        return info.rounding
    rules = {get_method(name).rounding for name, _, _ in terms(method, params)}
    return rules.pop() if len(rules) == 1 else "half_up"


@dataclass(frozen=True)
class StageTokens:
    """One stage at the plan's example inputs, per row."""
    stage: object
    tokens_in: int
    tokens_out: int
    candidates_in: int
    candidates_kept: int

    @property
    def dropped(self) -> int:
        return self.candidates_in - self.candidates_kept


def stage_tokens(plan) -> list[StageTokens]:
    """Tokens and candidates in and out of every stage, in pipeline order."""
    inputs = plan.lock["inputs"]
    tokens = {name: plan.adapter.tokens_at_input(name, inputs) for name in plan.adapter.domains()}
    out = []
    for stage in plan.stages:
        before = tokens[stage.domain]
        tokens[stage.domain] -= stage.n_candidates - stage.n_keep
        out.append(StageTokens(stage, before, tokens[stage.domain], stage.n_candidates, stage.n_keep))
    return out


def tokens_at_end(plan, domain: str) -> int:
    """Tokens domain `domain` holds after its last stage."""
    tokens = plan.adapter.tokens_at_input(domain, plan.lock["inputs"])
    return tokens - sum(t.dropped for t in stage_tokens(plan) if t.stage.domain == domain)


def domain_input(plan, name: str) -> tuple[int, int]:
    """(tokens, candidate tokens) domain `name` receives from the model's inputs, before any stage."""
    inputs, adapter = plan.lock["inputs"], plan.adapter
    stages = [s for s in plan.stages if s.domain == name]
    protect = stages[0].protect if stages else adapter.protectable
    return adapter.tokens_at_input(name, inputs), adapter.initial_candidates_from_config(inputs, protect)


def layer_tokens(plan, name: str) -> list[tuple[int, int]]:
    """(tokens, candidate tokens) that each layer of domain `name` sees, in layer order."""
    tokens, candidates = domain_input(plan, name)
    cuts = {}
    for stage in (s for s in plan.stages if s.domain == name):
        if stage.layer is None and stage.site != "projector.output":
            continue  # an encoder's output site cuts after its last layer: no layer sees the cut
        if stage.layer is None:  # the projector's output feeds the first LLM layer
            tokens -= stage.n_candidates - stage.n_keep
            candidates = stage.n_keep
        else:
            cuts[stage.layer] = stage
    out = []
    for layer in range(plan.adapter.domains()[name].num_layers):
        out.append((tokens, candidates))
        if layer in cuts:
            tokens -= cuts[layer].n_candidates - cuts[layer].n_keep
            candidates = cuts[layer].n_keep
    return out


def min_tokens(plan) -> int:
    """Shortest input sequence the pruned program accepts: every drop still leaves 2 tokens."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for stage in plan.stages:
        if stage.ragged:  # drops follow each row's own count, and a row keeps its text (>= 2 tokens)
            continue
        first.setdefault(stage.domain, stage.n_candidates)
        last[stage.domain] = stage.n_keep
    return max([2] + [first[d] - last[d] + 2 for d in first])


def position_offset(plan) -> int:
    """Tokens dropped up to the last stage that renumbers positions (pre-LLM stages renumber)."""
    offset = dropped = 0
    for t in stage_tokens(plan):
        dropped += t.dropped
        if t.stage.positions == "renumber":
            offset = dropped
    return offset


def position_layer(plan) -> int | None:
    """The first LLM layer after the last stage that renumbers positions (0 when none does): its
    prompt length is the position the first new token takes, for every row, ragged rows included
    (they are right-aligned); None when that stage cuts after the last layer (then
    `position_offset` says it)."""
    cuts = [s.layer for s in plan.stages if s.domain == "llm" and s.positions == "renumber"]
    layer = 0 if not cuts or cuts[-1] is None else cuts[-1] + 1
    return layer if layer < plan.adapter.domains()["llm"].num_layers else None


def scaled_counts(kept: list[int], first_candidates: int, factor: float) -> list[int]:
    """Every stage's kept count x `factor` (half up), chained so each keeps at least 1 and at most
    what reaches it; stages that keep 0 stay 0 (then nothing reaches the next)."""
    out, reaching = [], first_candidates
    for count in kept:
        scaled = 0 if count == 0 else min(reaching, max(1, round_count(count * factor, "half_up")))
        out.append(scaled)
        reaching = scaled
    return out
