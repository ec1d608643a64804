"""HoloV: crop-wise holistic scores decide each crop's quota; [CLS] attention picks within a crop
(NeurIPS 2025, arXiv 2510.02912). Official-code variant (obananas/HoloV, `llava/model/utils.py::HoloV`).

Code: the N visual tokens are split into `crops` contiguous raster-order chunks (16 of 36 tokens on
LLaVA-1.5). In a crop, with L2-normalized embeddings Z (M tokens): S = (1 - I) * Z Z^T, mu_i =
sum_j S_ij / (M - 1), V_i = sum_j (S_ij - mu_i)^2 / (M - 1) (j runs over the whole row, the zeroed
diagonal included); A = the head-mean [CLS] attention of the vision feature layer;
score = 1000 A + alpha * V * mean|1000 A| / mean|V| (means over the crop), alpha = 0.09. Crop
weights are the crop-mean scores normalized (tau = 1); quota_c = floor(w_c * N'), the remainder one
each to the highest-weight crops; inside a crop the top quota_c tokens by A alone.
Deviations: a quota above a crop's size is capped and the overflow goes, one token at a time, to
the highest-weight crops with room (the code zero-pads the output instead, which would feed the
LLM zero tokens); kept tokens return in position order (the code concatenates crops, each by
attention). The paper's 2-D crops, tau-sharpened quotas and context refetching are not in the code.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import select_by_attention
from .attention_maps import attention_probs


def holov_keep(qs, ks, masks, scales, is_causal, n_candidates: int, n_keep: int, features: torch.Tensor,
               crops: int = 16, alpha: float = 0.09) -> torch.Tensor:
    """features: [B, N, D] candidate embeddings; qs/ks: the vision feature layer's (last N keys are
    the candidates). Returns [B, n_keep] sorted candidate indices."""
    if n_candidates % crops:
        raise ValueError(f"holov splits {n_candidates} tokens into {crops} equal crops; choose a divisor")
    size = n_candidates // crops
    attention = attention_probs(qs[0][..., :1, :], ks[0], masks[0], scales[0], is_causal)[:, :, 0].mean(dim=1)
    attention = attention[:, -n_candidates:].view(-1, crops, size)
    z = torch.nn.functional.normalize(features.float(), dim=-1).view(-1, crops, size, features.shape[-1])
    sim = z @ z.transpose(-1, -2) * (1 - torch.eye(size, device=z.device))
    mu = sim.sum(dim=-1, keepdim=True) / max(size - 1, 1)
    variance = ((sim - mu) ** 2).sum(dim=-1) / max(size - 1, 1)  # [B, C, M]
    scaled = 1000 * attention
    score = scaled + alpha * variance * scaled.abs().mean(dim=-1, keepdim=True) / variance.abs().mean(
        dim=-1, keepdim=True).clamp(min=1e-12)
    weight = score.mean(dim=-1)
    weight = weight / weight.sum(dim=-1, keepdim=True)  # [B, C]
    rows = []
    for b in range(features.shape[0]):
        quota = torch.floor(weight[b] * n_keep).long().clamp(max=size)
        by_weight = torch.sort(weight[b], descending=True, stable=True).indices.tolist()
        while int(quota.sum()) < n_keep:  # remainder, then any overflow, to the heaviest crops with room
            for c in by_weight:
                if int(quota.sum()) < n_keep and quota[c] < size:
                    quota[c] += 1
        kept = []
        for c in range(crops):
            top = torch.sort(attention[b, c], descending=True, stable=True).indices[:int(quota[c])]
            kept += (c * size + top).tolist()
        rows.append(sorted(kept))
    return torch.tensor(rows, dtype=torch.long, device=features.device)


register_method(MethodInfo(
    name="holov",
    lower_select=select_by_attention,
    action="prune",
    kind="select",
    signals=("layer_attention", "hidden"),
    fn=holov_keep,
    attention_layers=lambda params, scoring: [scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "crops": {"type": "integer", "minimum": 1, "description": "contiguous raster chunks; official 16"},
            "alpha": {"type": "number", "minimum": 0, "description": "variance weight; official 0.09"},
        },
    },
    defaults={"crops": 16, "alpha": 0.09},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="crop quotas from [CLS] attention + similarity variance, [CLS] attention within each crop",
    source="obananas/HoloV llava/model/utils.py::HoloV",
))
