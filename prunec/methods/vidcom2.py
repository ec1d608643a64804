"""VidCom2: frame-adaptive budgets from frame uniqueness, then the most distinctive tokens per frame
(EMNLP 2025, arXiv 2505.14454), in the form vLLM ships (`multimodal/video_prune/vidcom2.py`).

Read through METHODS-2.md §5.2: keep the `max(1, int(D / 2))` lowest-variance channels; L2-normalise
each token; G(x, c) = sum over alpha in {1/8, 1/4, 1/2, 1, 2} of exp(-|x - c|^2 / (2 alpha));
v = G(token, video mean), f = G(token, its frame's mean); frame weights p = softmax((u - max u) / 0.01)
with u_t = -mean_n v; frame t keeps k_t = clamp(round(min(base (1 + p_t - mean p), 1) x tpf), 1, tpf)
tokens of smallest v + f; then vLLM reconciles to exactly `target` tokens (dropping the kept ones with
the largest v + f, or adding the others with the smallest). `base` = the stage's ratio; target = the
stage's count, int(ratio x N) as vLLM rounds. A row's images are its frames (until video spans land).

Only vLLM's exact-count form is implemented: the official code keeps sum(k_t), a count that depends
on the video (within a few tokens of base x N), which needs data-dependent kept counts.
"""
from __future__ import annotations

import torch

from .. import ops
from ..candidates import candidate_positions, candidate_rows, keep_indices, keep_shape
from ..lowering import Selection
from . import MethodInfo, register_method

ALPHAS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)


def _gaussians(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    squared = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-squared / (2 * alpha)) for alpha in ALPHAS)


def frame_budgets(u: torch.Tensor, base: float, per_frame: int) -> torch.Tensor:
    """[T] frame scores u -> [T] kept tokens per frame before reconciliation."""
    p = torch.softmax((u - u.max()) / 0.01, dim=0)
    scale = (base * (1 + p - p.mean())).clamp(max=1)
    return torch.round(scale * per_frame).clamp(1, per_frame).long()


def vidcom2_keep(features: torch.Tensor, frames: int, n_keep: int, base: float) -> torch.Tensor:
    """[N, D] one video's tokens (frame-major) -> [n_keep] sorted kept indices."""
    n, width = features.shape
    x = features.double()
    channels = torch.sort(x.var(dim=0, unbiased=False), stable=True).indices[:max(1, width // 2)]
    z = torch.nn.functional.normalize(x[:, channels], dim=-1).view(frames, n // frames, -1)
    v = _gaussians(z, z.reshape(n, -1).mean(dim=0))
    f = _gaussians(z, z.mean(dim=1, keepdim=True))
    budgets = frame_budgets(-v.mean(dim=1), base, n // frames)
    cost = (v + f).flatten()
    kept = torch.zeros(n, dtype=torch.bool)
    for t, k in enumerate(budgets.tolist()):
        local = torch.sort(cost[t * (n // frames):(t + 1) * (n // frames)], stable=True).indices[:k]
        kept[local + t * (n // frames)] = True
    extra = int(kept.sum()) - n_keep
    if extra > 0:  # drop the kept tokens with the largest v + f
        order = torch.sort(cost.masked_fill(~kept, float("-inf")), descending=True, stable=True).indices
        kept[order[:extra]] = False
    elif extra < 0:  # add the others with the smallest v + f
        order = torch.sort(cost.masked_fill(kept, float("inf")), stable=True).indices
        kept[order[:-extra]] = True
    return kept.nonzero()[:, 0]


@torch.library.custom_op("prunec::select_vidcom2", mutates_args=())
def select_vidcom2(hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int, frames: int,
                   base: float) -> torch.Tensor:
    """VidCom2 over each row's candidates, its frames' tokens in order."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    local = torch.stack([vidcom2_keep(features[b], frames, n_keep, base) for b in range(features.shape[0])])
    return keep_indices(candidates, positions, local.to(candidates.device))


@select_vidcom2.register_fake
def _(hidden, candidates, n_candidates, n_keep, frames, base):
    return keep_shape(candidates, n_candidates, n_keep)


ops.keep_index_op("select_vidcom2")


def _lower_select(b) -> Selection:
    kind, value = b.stage.keep_spec
    base = value if kind == "ratio" else b.stage.n_keep / b.stage.n_candidates
    return Selection(b.add("select", torch.ops.prunec.select_vidcom2.default,
                           (b.signal("hidden"), b.candidates, *b.sizes, b.images_per_row, float(base))))


def _check_budget(params, available, n_keep, adapter, protect, images):
    if images < 2:
        return "VidCom2 weighs frames against each other: a row needs 2 or more (inputs.images)", "site"
    if n_keep < images:
        return f"VidCom2 keeps at least one token per frame ({images}), not {n_keep}", "keep"
    return None


register_method(MethodInfo(
    name="vidcom2",
    action="prune",
    kind="select",
    signals=("hidden",),
    fn=vidcom2_keep,
    lower_select=_lower_select,
    check_budget=_check_budget,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm",),
    layer_domains=(),
    summary="video: frame budgets from frame uniqueness (softmax), then per frame the most distinctive tokens "
            "(Gaussian similarity on low-variance channels), reconciled to the exact count (vLLM)",
    source="xuyang-liu16/VidCom2 token_compressor/vidcom2/vidcom2.py; exact count as vLLM "
           "vllm/multimodal/video_prune/vidcom2.py",
    variants={"(count)": "official sum of per-frame counts (varies per video, not implemented) / vLLM exact count"},
    rounding="floor",
    rounding_source="vLLM: target = max(T, min(int(N * (1 - q)), N))",
))
