"""EVS, Efficient Video Sampling as vLLM ships it (arXiv 2510.14624; vLLM `multimodal/video_prune/evs.py`).

vLLM's `compute_retention_mask` (read through METHODS-2.md §5.1): a video's merged tokens as frames
x cells; each cell of frame t > 0 scores 1 - cos(its embedding, the same cell in frame t - 1); every
cell of frame 0 scores 255 (always kept); a *stable* descending sort over the flattened (t, cell)
order keeps the first k (ties to the earlier token), k = max(tokens per frame, int(T x tokens per
frame x (1 - q))). In prunec a row's images are its frames (until a family with video spans lands):
a ratio budget is (1 - q), rounded down as vLLM's int(), and a budget below one frame is refused.
vLLM keeps the kept tokens' original (t, y, x) positions; a LLaVA-style row renumbers them, as the
LLM sees a shorter sequence. The paper's RGB-patch form is not implemented.
"""
from __future__ import annotations

import torch

from ..candidates import candidate_positions, candidate_rows, row_scores_fake, scatter_rows
from . import MethodInfo, register_method


def frame_change(features: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T x P, D] tokens of T frames -> [B, T x P] fp32: 255 on frame 0, else 1 - cos to the previous frame's
    token at the same place."""
    batch, n, width = features.shape
    video = features.float().view(batch, frames, n // frames, width)
    change = 1 - torch.nn.functional.cosine_similarity(video[:, 1:], video[:, :-1], dim=-1, eps=1e-8)
    first = torch.full_like(video[:, :1, :, 0], 255.0)
    return torch.cat([first, change], dim=1).flatten(1)


@torch.library.custom_op("prunec::evs_scores", mutates_args=())
def evs_scores(hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int, frames: int) -> torch.Tensor:
    """EVS's scores over each row's candidates (its frames' tokens, in order): [B, S] fp32."""
    positions = candidate_positions(candidates, n_candidates)
    return scatter_rows(frame_change(candidate_rows(hidden, positions), frames), positions, candidates.shape[1])


@evs_scores.register_fake
def _(hidden, candidates, n_candidates, frames):
    return row_scores_fake(hidden, *candidates.shape)


def _lower_scores(b, method, params):
    return b.add("score", torch.ops.prunec.evs_scores.default,
                 (b.signal("hidden", method), b.candidates, b.n_candidates, b.images_per_row))


def _check_budget(params, available, n_keep, adapter, protect, images):
    if images < 2:
        return "EVS compares consecutive frames: a row needs 2 or more (inputs.images)", "site"
    if n_keep < available // images:
        return (f"EVS keeps every token of the first frame ({available // images}), so at least that many, "
                f"not {n_keep}", "keep")
    return None


register_method(MethodInfo(
    name="evs",
    action="prune",
    kind="score",
    signals=("hidden",),
    fn=frame_change,
    lower_scores=_lower_scores,
    check_budget=_check_budget,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="video: 1 - cosine to the same place in the previous frame, first frame always kept, stable top-k",
    source="vllm-project/vllm vllm/multimodal/video_prune/evs.py::compute_retention_mask",
    variants={"(signal)": "embedding cosine (vLLM, implemented) / RGB-patch L1 with a percentile threshold (paper)"},
    rounding="floor",
    rounding_source="vLLM compute_retained_tokens_count: max(tpf, int(T * tpf * (1 - q)))",
))
