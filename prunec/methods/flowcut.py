"""FlowCut: information-flow scores accumulated over ViT layers (NeurIPS 2025, arXiv 2505.19536).

Official code (TungChintao/FlowCut, `utils_flowcut.py::compute_score`, `modeling_clip_flowcut.py`):
per layer, relation a_j = mean_h softmax(q_CLS . k_j * scale), semantic s_j = mean_h softmax(v_CLS .
v_j) (no scaling), and score_j = (a_j / sum a + s_j / sum s) * |mean_h v_j|_1, sums over the patches;
the cumulative score is the score at the first scored layer, then C <- 0.5 C + 0.5 score at every
later layer. prunec scores layers `accumulate_from` .. site (default: the site layer) and carries C
to the next FlowCut stage, gathered like the sequence. The official count per layer is adaptive
(r = (N - target) / sqrt(rpl) * (1 - H_ratio^2), H_ratio the [CLS] attention's normalized entropy),
which differs per image; a batched program with static shapes cannot express that, so the schedule
is the spec's budgets. LLaVA's vision tower is not a prunec site, so FlowCut runs on ViT families.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import attention_map_scores
from .attention_maps import attention_probs


def flow_scores(qs, ks, masks, scales, is_causal: bool, valid, candidates=None, values=(), prior=None) -> torch.Tensor:
    """[B, S] cumulative FlowCut score over the given layers (continuing `prior`); 0 off candidates."""
    cumulative = prior
    for q, k, v, mask, scale in zip(qs, ks, values, masks, scales):
        relation = attention_probs(q[..., :1, :], k, mask, scale, is_causal)[:, :, 0].mean(dim=1)  # [B, S]
        semantic = attention_probs(v[..., :1, :], v, mask, 1.0, is_causal)[:, :, 0].mean(dim=1)
        magnitude = v.float().mean(dim=1).abs().sum(dim=-1)  # [B, S]
        cands = candidates.float() if candidates is not None else torch.ones_like(relation)
        score = (relation * cands / (relation * cands).sum(dim=1, keepdim=True)
                 + semantic * cands / (semantic * cands).sum(dim=1, keepdim=True)) * magnitude
        cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
    return cumulative


register_method(MethodInfo(
    name="flowcut",
    lower_scores=attention_map_scores,
    action="prune",
    kind="score",
    signals=("layer_attention",),
    fn=flow_scores,
    attention_layers=lambda params, scoring: [scoring],
    accumulates=True,
    reads_values=True,
    layer_params=("accumulate_from",),
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"accumulate_from": {"type": "integer", "minimum": 0,
                                           "description": "first scored layer (0-indexed); the official loop starts at "
                                                          "layer 0"}},
    },
    default_positions="keep_original",
    domains=("vision", "encoder"),
    layer_sites_only=True,
    summary="[CLS] relation + value-similarity semantics x value magnitude, EMA over layers (fixed schedule)",
    source="TungChintao/FlowCut flowcut/utils_flowcut.py::compute_score",
))
