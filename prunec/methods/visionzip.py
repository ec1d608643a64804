"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity
(CVPR 2025, arXiv 2412.04467).

Official code (dvlab-research/VisionZip, `visionzip/clip_encoder.py`): at the vision feature layer,
dominant = the patches with the highest [CLS] attention summed over heads; among the rest, keys
averaged over heads and L2-normalized, C targets chosen by stride (step = M // C, the first C), every
other token assigned to its most similar target (ties: lower index), and each contextual token =
target + the mean of its members (a target with no member stays itself). Deviations, because of how
prunec's LLaVA site works: the merge runs on the projected tokens at `projector.output` (the official
code merges the vision hidden states before the projector); the [CLS] feature is not among the kept
tokens (LLaVA's default feature strategy drops it), so all `n_keep - contextual` dominant tokens are
patches; kept tokens stay in position order (the official code puts the contextual ones last).
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .attention_maps import attention_probs
from .merging import group_means, in_position_order


def dominant_contextual(features: torch.Tensor, n_keep: int, qs, ks, masks, scales, is_causal: bool,
                        contextual: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """features: [B, N, D] candidate tokens (patches); qs/ks: the feature layer's, over [lead + N] keys.
    Returns ([B, n_keep] sorted kept indices, [B, n_keep, D] their values)."""
    n = features.shape[1]
    cls = attention_probs(qs[0][..., :1, :], ks[0], masks[0], scales[0], is_causal)[:, :, 0].sum(dim=1)[:, -n:]
    keys = torch.nn.functional.normalize(ks[0].float().mean(dim=1)[:, -n:], dim=-1)  # [B, N, hd]
    n_dominant = n_keep - contextual
    rows_index, rows_values = [], []
    for b in range(features.shape[0]):
        order = torch.sort(cls[b], descending=True, stable=True).indices
        dominant = order[:n_dominant].sort().values
        rest = order[n_dominant:].sort().values  # remaining tokens, position order
        step = max(rest.numel() // contextual, 1)
        target_slots = torch.arange(0, rest.numel(), step, device=features.device)[:contextual]
        targets = rest[target_slots]
        others = rest[~torch.isin(torch.arange(rest.numel(), device=features.device), target_slots)]
        similarity = keys[b, others] @ keys[b, targets].T  # [M - C, C]
        assign = similarity.argmax(dim=1) if others.numel() else others
        values = features[b].float()
        merged = values[targets] + group_means(values[others], assign, contextual)
        index, value = in_position_order(torch.cat([dominant, targets]), torch.cat([values[dominant], merged]))
        rows_index.append(index)
        rows_values.append(value)
    return torch.stack(rows_index), torch.stack(rows_values).to(features.dtype)


register_method(MethodInfo(
    name="visionzip",
    action="merge",
    kind="merge",
    signals=("hidden", "layer_attention"),
    fn=dominant_contextual,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "required": ["contextual"],
        "properties": {"contextual": {"type": "integer", "minimum": 1,
                                      "description": "contextual tokens; the rest of the budget is dominant "
                                                     "(README 54 + 10 for 64)"}},
    },
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="dominant by [CLS] attention (feature layer) + contextual: targets by stride, key-similarity merge",
    source="dvlab-research/VisionZip visionzip/clip_encoder.py",
))
