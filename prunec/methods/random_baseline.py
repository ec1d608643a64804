"""Random: keep a seeded random subset of the candidates, the baseline benchmark studies found hard
to beat (UniPruneBench, arXiv 2511.02650; LightCompress `token_reduction/random.py`).

LightCompress: `randperm(n)[:k]`, sorted, with `k = round(n (1 - prune_ratio))`. prunec draws that
permutation per row from a generator seeded with the stage's `seed` (recorded in the lock), on the
CPU whatever the device: the same seed and the same row give the same tokens in every run, build,
batch position and device, and a row in a batch keeps what it keeps alone. As scores, a candidate's
score is how early it comes in the permutation, so the top-k is exactly the first k of the
permutation, for every k (run-time budgets included) and in fusions.
UniPruneBench truncates (`int(n keep)`): `rounding: floor`; its pre-LLM InternVL path also leaves the
kept tokens unsorted (random order), which prunec does not offer (the order of kept tokens follows
the sequence everywhere).
"""
from __future__ import annotations

import torch

from ..candidates import row_scores_fake
from . import MethodInfo, register_method


def permutation_scores(n: int, seed: int) -> torch.Tensor:
    """[n] fp32: n - i for the i-th element of `randperm(n)` drawn from a generator seeded with `seed`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.empty(n).index_put_((order,), torch.arange(n, 0, -1, dtype=torch.float32))


@torch.library.custom_op("prunec::random_scores", mutates_args=())
def random_scores(candidates: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, S] bool candidates -> [B, S] fp32 permutation scores over each row's own candidates, 0 elsewhere."""
    out = torch.zeros(candidates.shape, dtype=torch.float32)
    for b, row in enumerate(candidates.cpu()):
        positions = row.nonzero()[:, 0]
        out[b, positions] = permutation_scores(positions.numel(), seed)
    return out.to(candidates.device)


@random_scores.register_fake
def _(candidates, seed):
    return row_scores_fake(candidates, *candidates.shape)


def _lower_scores(b, method, params):
    return b.add("score", torch.ops.prunec.random_scores.default, (b.candidates, int(params["seed"])))


register_method(MethodInfo(
    name="random",
    action="prune",
    kind="score",
    signals=(),
    fn=permutation_scores,
    lower_scores=_lower_scores,
    row_budgets=True,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                                "description": "generator seed; each row draws its permutation from it"}},
    },
    defaults={"seed": 0},
    default_positions="renumber",
    summary="seeded random subset of the candidates (the permutation's first k); the floor every method must beat",
    source="LightCompress llmc/compression/token_reduction/random.py; UniPruneBench methods/Random_PreLLM.py",
    variants={"rounding": "half_even (LightCompress round) / floor (UniPruneBench int)",
              "positions": "renumber (UniPruneBench, LLaVA) / keep_original (LightCompress in the LLM)"},
    rounding="half_even",
    rounding_source="LightCompress random.py: round(n * (1 - prune_ratio)) (Python's round, half to even)",
))
