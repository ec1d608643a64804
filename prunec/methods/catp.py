"""CATP: contextually adaptive token pruning for multimodal in-context learning (AAAI 2026, arXiv
2508.07871; no official code found, so this follows the paper's formulas).

Stage 1 (`catp`, before the LLM, per image): choose Y (|Y| = the image's budget) maximizing
F_div(Y) + lambda_1 F_align(Y) with s(x, y) = (cos(x, y) + 1) / 2: F_div(Y) = sum over the image's
tokens x of max over y in Y of s(y, x) (facility location), F_align(Y) = sum over y in Y of s(y, t),
t the mean embedding of the image's paired text: the text after it, up to the next image or the
row's end (a row without any has F_align = 0). The objective is submodular; the standard greedy
adds the token with the largest marginal gain. Gains within 1e-6 (relative) count as tied and the
lower index wins: symmetric pairs tie exactly in exact arithmetic, and float sums in different
orders would otherwise break those ties arbitrarily. lambda_1 = 0.7; the paper keeps
floor(S (1 - R/2)) tokens per image here.
Stage 2 (in the LLM, rows with several images: demonstrations, then the query image last):
`catp_context` at layer K scores every demonstration image token c globally by
max(0, A_K[last, c] - A_{K-1}[last, c]) + lambda_2 cos(h_c, mean h over the query sample), A the
head-mean attention of the row's last token, h the hidden states after layer K, the query sample
the tokens from the query image's first token to the row's end (real tokens; whether the paper's
"query-sample tokens" include the query image is unclear: they do here); lambda_2 = 0.6.
`catp_query` at layer K + 1 scores the query image's tokens by cos(h_q, mean h of the remaining
demonstration image tokens). The paper's K: 6 on LLaVA-NeXT-7B.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .lowerings import image_context_scores
from .attention_maps import attention_probs

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
    per_image=True,
    summary="stage 1: per image, greedy facility-location diversity + alignment with the image's paired text",
    source="CATP paper (AAAI 2026, arXiv 2508.07871) §3; no official code found",
))


def _mean_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, D] mean of hidden ([B, S, D]) over the positions marked in rows ([B, S] bool); zeros where none."""
    weights = rows.float()
    return torch.einsum("bs,bsd->bd", weights, hidden.float()) / weights.sum(dim=1, keepdim=True).clamp(min=1)


def _cosine_to(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(hidden.float(), target[:, None, :], dim=-1)


def context_scores(hidden, image_positions, n_query: int, valid, qs, ks, masks, scales, is_causal: bool,
                   similarity: float = 0.6) -> torch.Tensor:
    """[B, S] stage-2 scores of the demonstration image tokens at layer K (qs/ks: layers K - 1, K;
    hidden: after layer K; image_positions: [B, n] every image token, the query image's last)."""
    last_rows = []
    for q, k, mask, scale in zip(qs, ks, masks, scales):
        probs = attention_probs(q[..., -1:, :], k, mask, scale, is_causal, q.shape[-2] - 1)  # [B, H, 1, S]
        last_rows.append(probs[:, :, 0].mean(dim=1))
    growth = (last_rows[1] - last_rows[0]).clamp(min=0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    query_start = image_positions[:, image_positions.shape[1] - n_query]
    sample = positions[None, :] >= query_start[:, None]
    if valid is not None:
        sample = sample & valid
    return growth + similarity * _cosine_to(hidden, _mean_rows(hidden, sample))


def query_scores(hidden, image_positions, n_query: int, valid, qs, ks, masks, scales, is_causal: bool
                 ) -> torch.Tensor:
    """[B, S] stage-2 scores of the query image tokens at layer K + 1: cosine to the mean of the
    remaining demonstration image tokens."""
    context = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    context.scatter_(1, image_positions[:, :image_positions.shape[1] - n_query], True)
    return _cosine_to(hidden, _mean_rows(hidden, context))


register_method(MethodInfo(
    name="catp_context",
    lower_scores=image_context_scores,
    action="prune",
    kind="score",
    signals=("image_context", "layer_attention"),
    fn=context_scores,
    attention_layers=lambda params, scoring: [scoring - 1, scoring],
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"similarity": {"type": "number", "minimum": 0,
                                      "description": "lambda_2: weight of the similarity to the query sample (0.6)"}},
    },
    defaults={"similarity": 0.6},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    scope="context",
    summary="stage 2 at layer K: demonstration image tokens by attention growth + similarity to the query sample",
    source="CATP paper (AAAI 2026, arXiv 2508.07871) §3; no official code found",
))

register_method(MethodInfo(
    name="catp_query",
    lower_scores=image_context_scores,
    action="prune",
    kind="score",
    signals=("image_context",),
    fn=query_scores,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    scope="query",
    summary="stage 2 at layer K + 1: query image tokens by similarity to the remaining demonstration image tokens",
    source="CATP paper (AAAI 2026, arXiv 2508.07871) §3; no official code found",
))
