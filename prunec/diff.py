"""Semantic diff of two specs (or locks): compared after `extends`, defaults and site lists are
resolved, so formatting, key order and inherited-vs-written values never show up as differences."""
from __future__ import annotations

from dataclasses import dataclass

from .flops import estimate
from .schedule import tokens_at_end
from .spec import Plan, Stage

_NOT_SEMANTIC = ("name", "description", "output")  # change the artifact, not the computation


@dataclass(frozen=True)
class Difference:
    where: str
    before: str
    after: str
    semantic: bool = True

    def __str__(self) -> str:
        tag = "" if self.semantic else " (not semantic)"
        return f"{self.where}: {self.before} -> {self.after}{tag}"


def _stage_fields(stage: Stage) -> dict[str, str]:
    return {
        "method": stage.method,
        "params": ", ".join(f"{k}={v}" for k, v in stage.params) or "-",
        "keep": f"{stage.n_keep} of {stage.n_candidates} candidates",
        "positions": stage.positions,
        "protect": ", ".join(stage.protect) or "-",
        "action": stage.action,
    }


def differences(a: Plan, b: Plan) -> list[Difference]:
    out: list[Difference] = []
    for key in ("model", "inputs", "backend", *_NOT_SEMANTIC):
        va, vb = a.lock.get(key), b.lock.get(key)
        if va != vb:
            out.append(Difference(key, _short(va), _short(vb), key not in _NOT_SEMANTIC))
    stages_a = {s.site: s for s in a.stages}
    stages_b = {s.site: s for s in b.stages}
    for site in sorted(set(stages_a) | set(stages_b), key=lambda s: _order(s, a, b)):
        sa, sb = stages_a.get(site), stages_b.get(site)
        if sa is None:
            out.append(Difference(f"stage {site}", "absent", f"{sb.method}, keep {sb.n_keep}/{sb.n_candidates}"))
        elif sb is None:
            out.append(Difference(f"stage {site}", f"{sa.method}, keep {sa.n_keep}/{sa.n_candidates}", "absent"))
        else:
            fa, fb = _stage_fields(sa), _stage_fields(sb)
            out.extend(Difference(f"stage {site} {field}", fa[field], fb[field]) for field in fa if fa[field] != fb[field])
    return out


def _order(site: str, a: Plan, b: Plan) -> int:
    sites = [s.site for s in a.stages] + [s.site for s in b.stages]
    return sites.index(site)


def _short(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return "absent" if value is None else str(value)


def consequences(a: Plan, b: Plan) -> list[str]:
    """What the differences do: tokens reaching the end of each domain, and prefill FLOPs."""
    lines = []
    for plan_name, plan in (("A", a), ("B", b)):
        ends = []
        for domain in plan.adapter.domains():
            tokens = tokens_at_end(plan, domain)
            ends.append(f"{domain} ends with {tokens} tokens")
        lines.append(f"{plan_name}: {', '.join(ends)}; prefill FLOPs {estimate(plan)['ratio']:.1%} of unpruned")
    return lines
