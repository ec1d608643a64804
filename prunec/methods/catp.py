"""CATP stage 1: facility-location diversity plus alignment with the paired text, greedy (AAAI 2026,
arXiv 2508.07871; no official code found, so this follows the paper's formulas).

For an image's tokens X choose Y (|Y| = the budget) maximizing F_div(Y) + lambda_1 F_align(Y) with
s(x, y) = (cos(x, y) + 1) / 2: F_div(Y) = sum over x in X of max over y in Y of s(y, x) (facility
location), F_align(Y) = sum over y in Y of s(y, t), t the mean embedding of the paired text. The
objective is submodular; the standard greedy adds the token with the largest marginal gain. Gains
within 1e-6 (relative) count as tied and the lower index wins: symmetric pairs tie exactly in exact
arithmetic, and float sums in different orders would otherwise break those ties arbitrarily. prunec's LLaVA rows hold one image, so its paired text is the text after the
image (the question); a row without any has F_align = 0. lambda_1 = 0.7 (paper). The paper keeps
floor(S (1 - R/2)) tokens per image here. Stage 2 (demonstration images at layer K by attention
growth, the query image at K + 1 by similarity to the context images) needs several images per
row, which the LLaVA adapter does not take: not implemented.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method

TIE = 1e-6  # relative gap under which two gains are the same


def facility_location_keep(features: torch.Tensor, n_keep: int, text: torch.Tensor, alignment: float = 0.7
                           ) -> torch.Tensor:
    """features: [B, N, D] candidate tokens; text: [B, D] mean of the paired text (zeros: none).
    Returns [B, n_keep] sorted candidate indices."""
    z = torch.nn.functional.normalize(features.float(), dim=-1)
    similarity = (z @ z.transpose(1, 2) + 1) / 2  # [B, N, N]: s(y, x)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    align = torch.where(text.abs().sum(dim=-1, keepdim=True) > 0, (torch.einsum("bnd,bd->bn", z, t) + 1) / 2, 0.0)
    rows = []
    for b in range(features.shape[0]):
        cover = torch.zeros(features.shape[1], device=features.device)
        taken = torch.zeros(features.shape[1], dtype=torch.bool, device=features.device)
        for _ in range(n_keep):
            gain = (similarity[b] - cover[None, :]).clamp(min=0).sum(dim=1) + alignment * align[b]
            gain = gain.masked_fill(taken, float("-inf"))
            best = float(gain.max())
            pick = int((gain >= best - TIE * max(1.0, abs(best))).nonzero()[0])
            taken[pick] = True
            cover = torch.maximum(cover, similarity[b, pick])
        rows.append(taken.nonzero().flatten())
    return torch.stack(rows)


register_method(MethodInfo(
    name="catp",
    action="prune",
    kind="select",
    signals=("hidden",),
    fn=facility_location_keep,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"alignment": {"type": "number", "minimum": 0,
                                     "description": "lambda_1: weight of the text-alignment term (0.7)"}},
    },
    defaults={"alignment": 0.7},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    paired_text=True,
    summary="stage 1: greedy facility-location diversity + alignment with the text after the image",
    source="CATP paper (AAAI 2026, arXiv 2508.07871) §3; no official code found; stage 2 needs multi-image rows",
))
