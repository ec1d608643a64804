"""CDPruner: instruction-conditioned DPP over the visual tokens (NeurIPS 2025, arXiv 2506.10967).

Official code (Theia-4869/CDPruner `llava_arch.py::encode_images`, read through METHODS-2.md §1):
similarity S = cosine of the projected visual tokens; relevance r = min-max of each token's mean
cosine to the instruction's embeddings, `(rho - min + 1e-6) / (max - min)`; kernel L = diag(r) S
diag(r); T tokens by the fast greedy MAP of Chen et al. 2018 (no early stop), kept in position order.

Relevance, where prunec cannot follow the official code: the official relevance uses CLIP's text
tower and `visual_projection` (negated cosine, `-mean`), which the LLaVA checkpoint does not carry.
prunec implements the port OpenVINO GenAI ships (`cdpruner/relevance_calculator.cpp`): the instruction
is the tokens after the image, embedded by the LLM's own embedding table (they are the site's rows),
cosine with the projected visual tokens, not negated (`sign: -1` negates as the CLIP path does);
min-max over the row's visual tokens (all 1 when they are equally relevant, the port's guard). So
this is CDPruner's selection with the port's relevance, not the official CLIP relevance.

Rank: the official greedy divides by sqrt(d^2) with no stop, so once the kernel's rank (at most the
feature width) is spent d^2 reaches 0 and every later pick is NaN-driven. prunec stops the DPP there
and fills the rest of the budget with the most relevant tokens not yet chosen (ties: lower index), so a
stage always keeps its budget; before the rank runs out the two agree.
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from .. import ops
from ..candidates import candidate_positions, keep_indices, keep_shape
from ..lowering import Selection
from . import MethodInfo, register_method

RANK_EPS = 1e-10  # d^2 at or below this: the kernel's rank is spent


def relevance(features: torch.Tensor, instruction: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """[N, D] visual tokens, [M, D] instruction embeddings -> [N] min-max relevance in (0, 1 + 1e-6/range]."""
    cos = torch.nn.functional.normalize(features.double(), dim=-1) @ \
        torch.nn.functional.normalize(instruction.double(), dim=-1).T
    rho = sign * cos.mean(dim=1)
    spread = rho.max() - rho.min()
    if spread < 1e-12:  # every token equally relevant: the port's guard (the official code divides by 0)
        return torch.ones_like(rho)
    return (rho - rho.min() + 1e-6) / spread


def dpp_greedy(kernel: torch.Tensor, n_keep: int, fill: torch.Tensor) -> list[int]:
    """Fast greedy MAP of a DPP with kernel [N, N]: n_keep indices in pick order; once d^2 <= RANK_EPS the
    rest come from `fill` ([N] scores, highest first) among the tokens not yet chosen."""
    n = kernel.shape[0]
    c = kernel.new_zeros(n_keep, n)
    d2 = kernel.diagonal().clone()
    chosen: list[int] = []
    for i in range(n_keep):
        j = int(d2.argmax())
        if not d2[j] > RANK_EPS:
            break
        chosen.append(j)
        e = (kernel[j] - c[:i, j] @ c[:i]) / d2[j].sqrt()
        c[i] = e
        d2 = d2 - e * e
        d2[j] = float("-inf")
    taken = set(chosen)
    rest = [k for k in torch.sort(fill, descending=True, stable=True).indices.tolist() if k not in taken]
    return chosen + rest[:n_keep - len(chosen)]


def cdpruner_keep(features: torch.Tensor, instruction: torch.Tensor, n_keep: int, sign: float = 1.0) -> list[int]:
    """One row: [N, D] visual tokens, [M, D] instruction embeddings -> n_keep sorted indices."""
    r = relevance(features, instruction, sign)
    normed = torch.nn.functional.normalize(features.double(), dim=-1)
    kernel = r[:, None] * (normed @ normed.T) * r[None, :]
    return sorted(dpp_greedy(kernel, n_keep, r))


@torch.library.custom_op("prunec::select_cdpruner", mutates_args=())
def select_cdpruner(hidden: torch.Tensor, candidates: torch.Tensor, valid: Optional[torch.Tensor], n_candidates: int,
                    n_keep: int, params: str) -> torch.Tensor:
    """CDPruner over each row's candidates; the instruction is the row's tokens after its last candidate."""
    sign = json.loads(params)["sign"]
    positions = candidate_positions(candidates, n_candidates)
    local = []
    for b in range(candidates.shape[0]):
        after = positions[b, -1] + 1
        if after >= candidates.shape[1]:
            raise ValueError(f"prunec: CDPruner conditions on the instruction after the image, and row {b} ends "
                             "with its image")
        local.append(cdpruner_keep(hidden[b, positions[b]], hidden[b, after:], n_keep, sign))
    return keep_indices(candidates, positions, torch.tensor(local, device=candidates.device))


@select_cdpruner.register_fake
def _(hidden, candidates, valid, n_candidates, n_keep, params):
    return keep_shape(candidates, n_candidates, n_keep)


ops.keep_index_op("select_cdpruner")


def _lower_select(b) -> Selection:
    return Selection(b.add("select", torch.ops.prunec.select_cdpruner.default,
                           (b.signal("hidden"), b.candidates, b.valid, *b.sizes,
                            json.dumps(b.stage.param_dict, sort_keys=True))))


register_method(MethodInfo(
    name="cdpruner",
    action="prune",
    kind="select",
    signals=("hidden",),
    fn=cdpruner_keep,
    lower_select=_lower_select,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"sign": {"enum": [1, -1], "description": "relevance = sign x mean cosine to the instruction: "
                                                                "+1 (OpenVINO port, LLM embeddings) / -1 (official "
                                                                "CLIP path's negation)"}},
    },
    defaults={"sign": 1},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="conditional DPP: relevance to the instruction (LLM embeddings) x cosine similarity kernel, greedy MAP",
    source="Theia-4869/CDPruner llava/model/llava_arch.py::encode_images (selection); relevance as OpenVINO GenAI "
           "src/cpp/src/visual_language/cdpruner/relevance_calculator.cpp",
    variants={"sign": "+1 (port, LLM embeddings) / -1 (official, CLIP text tower: not available)",
              "(rank)": "official picks NaN-driven tokens once the kernel rank is spent / prunec fills by relevance"},
))
