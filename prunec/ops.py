"""Pruning ops as torch.library custom ops in the `prunec` namespace.

Each op has a fake implementation, so it survives torch.export and torch.compile. On CUDA tensors
(with Triton installed) `attention_received`, `select_topk`, `select_divprune` (its greedy loop),
`token_transition` and `gather_tokens` run Triton kernels
(`prunec/kernels/`); everywhere else, and for the other ops, they run torch.
Selection ops return sorted keep indices over the whole sequence: every non-candidate token plus the
kept candidates, so all rows keep the same count.
"""
from __future__ import annotations

import json
from typing import List, Optional, Tuple

import torch

from .kernels import use_triton
from .methods import get_method
from .methods.divprune import diversity_order_scores, divprune_keep
from .methods.fastv import attention_received as _attention_received
from .methods.fastv import reduce_rows
from .methods.fuse import fuse_scores as _fuse_scores
from .methods.sparsevlm import rater_attention as _rater_attention
from .methods.sparsevlm import text_raters as _text_raters
from .methods.tome import tome_merge as _tome_merge
from .methods.transprune import instruction_attention as _instruction_attention
from .methods.transprune import token_transition as _token_transition
from .methods.vflowopt import importance_over_sequence


# ops whose output (or first output, for merges) is a stage's [B, K] keep indices, for tools that
# trace an emitted module's selections (keep-maps)
KEEP_INDEX_OPS = ("select_topk", "select_divprune", "select_by_attention", "select_by_features", "drop_candidates",
                  "merge_candidates", "merge_by_scores", "tome_merge")


def _check_count(candidates: torch.Tensor, n_candidates: int) -> None:
    counts = candidates.sum(dim=1)
    if bool((counts != n_candidates).any()):
        raise ValueError(
            f"prunec: this module was built for {n_candidates} candidate tokens per row "
            f"(budgets are resolved at build time), but the rows hold {counts.tolist()}"
        )


def _candidate_positions(candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[B, S] bool -> [B, n_candidates] sorted positions; every row must hold n_candidates."""
    _check_count(candidates, n_candidates)
    return candidates.nonzero()[:, 1].view(candidates.shape[0], n_candidates)


def _candidate_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, S, D] hidden states -> [B, N, D] rows of the candidates at `positions` ([B, N])."""
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def _merged_back(hidden: torch.Tensor, positions: torch.Tensor, local: torch.Tensor, merged: torch.Tensor):
    """A copy of `hidden` whose surviving candidates (`local` into `positions`) hold `merged`."""
    rows = positions.gather(1, local)
    return hidden.clone().scatter_(1, rows[..., None].expand(-1, -1, hidden.shape[-1]), merged.to(hidden.dtype))


def _keep_indices(candidates: torch.Tensor, positions: torch.Tensor, local_keep: torch.Tensor) -> torch.Tensor:
    """Union of the non-candidates and the kept candidates, as sorted [B, K] sequence indices."""
    keep = ~candidates
    keep = keep.scatter(1, positions.gather(1, local_keep), True)
    kept = candidates.shape[1] - positions.shape[1] + local_keep.shape[1]
    return keep.nonzero()[:, 1].reshape(candidates.shape[0], kept).clone()  # own storage, offset 0


def _keep_shape(candidates: torch.Tensor, n_candidates: int, n_keep: int) -> torch.Tensor:
    batch, seq = candidates.shape
    return candidates.new_empty((batch, seq - n_candidates + n_keep), dtype=torch.long)


@torch.library.custom_op("prunec::attention_received", mutates_args=())
def attention_received(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                       is_causal: bool, query: str) -> torch.Tensor:
    """Head-averaged attention each token receives from the chosen query rows: [B, S] float32."""
    if use_triton(q, k) and q.shape[-1] & (q.shape[-1] - 1) == 0:
        from .kernels.attention_rows import attention_rows

        rows = q[..., -1:, :] if query == "last" else q
        return reduce_rows(attention_rows(rows, k, mask, scale, is_causal), query)
    return _attention_received(q, k, mask, scale, is_causal, query)


@attention_received.register_fake
def _(q, k, mask, scale, is_causal, query):
    return q.new_empty((q.shape[0], k.shape[-2]), dtype=torch.float32)


@torch.library.custom_op("prunec::select_topk", mutates_args=())
def select_topk(scores: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int) -> torch.Tensor:
    """Keep the n_keep highest-scoring candidates (ties: lower index) and every non-candidate."""
    if use_triton(scores, candidates):
        from .kernels.topk_spans import topk_spans

        _check_count(candidates, n_candidates)
        return topk_spans(scores.float(), candidates, n_candidates, n_keep)
    positions = _candidate_positions(candidates, n_candidates)
    cand_scores = scores.float().gather(1, positions)
    order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices
    return _keep_indices(candidates, positions, order[:, :n_keep])


@select_topk.register_fake
def _(scores, candidates, n_candidates, n_keep):
    return _keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::select_divprune", mutates_args=())
def select_divprune(hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int) -> torch.Tensor:
    """DivPrune over the candidates' hidden states; keeps every non-candidate."""
    positions = _candidate_positions(candidates, n_candidates)
    features = _candidate_rows(hidden, positions)
    greedy = None
    if use_triton(hidden):
        from .kernels.max_min_greedy import max_min_greedy as greedy
    return _keep_indices(candidates, positions, divprune_keep(features, n_keep, greedy))


@select_divprune.register_fake
def _(hidden, candidates, n_candidates, n_keep):
    return _keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, index: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """Apply [B, K] keep indices along each token axis in `dims` (dim 0 is batch, size 1 broadcasts)."""
    if use_triton(x, index):
        from .kernels.gather import gather_rows

        out = x
        for dim in dims:  # the kernel gathers dim 1; move each token axis there and back
            out = gather_rows(out.movedim(dim, 1), index).movedim(1, dim)
        return out.contiguous()
    return _gather_torch(x, index, dims)


def _gather_torch(x: torch.Tensor, index: torch.Tensor, dims: List[int]) -> torch.Tensor:
    batch, kept = index.shape
    out = x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x
    for dim in dims:
        view = [batch] + [1] * (out.dim() - 1)
        view[dim] = kept
        shape = list(out.shape)
        shape[dim] = kept
        out = out.gather(dim, index.view(view).expand(shape))
    return out.clone() if out is x else out


def _gathered_like(x, index, dims):
    shape = [index.shape[0]] + list(x.shape[1:])
    for dim in dims:
        shape[dim] = index.shape[1]
    return x.new_empty(shape)


@gather_tokens.register_fake
def _(x, index, dims):
    return _gathered_like(x, index, dims)


@torch.library.custom_op("prunec::gather_tokens_many", mutates_args=())
def gather_tokens_many(xs: List[torch.Tensor], index: torch.Tensor) -> List[torch.Tensor]:
    """`gather_tokens(x, index, [1])` for every x at once: one kernel launch (per word width) on GPU."""
    if use_triton(index, *xs):
        from .kernels.gather_many import gather_many

        return gather_many(list(xs), index)
    return [_gather_torch(x, index, [1]) for x in xs]


@gather_tokens_many.register_fake
def _(xs, index):
    return [_gathered_like(x, index, [1]) for x in xs]


@torch.library.custom_op("prunec::span_mask", mutates_args=())
def span_mask(x: torch.Tensor, first: int) -> torch.Tensor:
    """[B, S] bool, True from token `first` on: the candidates of an encoder with leading [CLS]."""
    positions = torch.arange(x.shape[1], device=x.device)
    return (positions >= first).expand(x.shape[0], -1).clone()


@span_mask.register_fake
def _(x, first):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.bool)


@torch.library.custom_op("prunec::prefix_mask", mutates_args=())
def prefix_mask(x: torch.Tensor, protect_last: int) -> torch.Tensor:
    """[B, S] bool, True before the last `protect_last` tokens: the candidates of a text sequence."""
    positions = torch.arange(x.shape[1], device=x.device)
    return (positions < x.shape[1] - protect_last).expand(x.shape[0], -1).clone()


@prefix_mask.register_fake
def _(x, protect_last):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.bool)


def _row_scores_fake(like: torch.Tensor, batch: int, seq) -> torch.Tensor:
    return like.new_empty((batch, seq), dtype=torch.float32)


@torch.library.custom_op("prunec::token_transition", mutates_args=())
def token_transition(x_in: torch.Tensor, x_out: torch.Tensor, valid: Optional[torch.Tensor], cos: str) -> torch.Tensor:
    """TransPrune's TTV of one sub-block: [B, S] fp32, softmax over each row's valid tokens."""
    if use_triton(x_in, x_out):
        from .kernels.token_transition import token_transition as kernel

        return kernel(x_in, x_out, valid, abs_cos=cos == "abs")
    return _token_transition(x_in, x_out, valid, cos)


@token_transition.register_fake
def _(x_in, x_out, valid, cos):
    return _row_scores_fake(x_in, x_in.shape[0], x_in.shape[1])


@torch.library.custom_op("prunec::instruction_attention", mutates_args=())
def instruction_attention(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                          is_causal: bool, candidates: torch.Tensor) -> torch.Tensor:
    """TransPrune's IGA: head-mean attention from the rows after the last candidate, row-averaged."""
    return _instruction_attention(q, k, mask, scale, is_causal, candidates)


@instruction_attention.register_fake
def _(q, k, mask, scale, is_causal, candidates):
    return _row_scores_fake(q, candidates.shape[0], candidates.shape[1])


@torch.library.custom_op("prunec::fuse_scores", mutates_args=())
def fuse_scores(scores: List[torch.Tensor], candidates: torch.Tensor, weights: List[float], fusion: str,
                normalize: str) -> torch.Tensor:
    """Weighted sum of normalized scores, or rank fusion, over the candidates: [B, S] fp32."""
    return _fuse_scores(scores, candidates, weights, fusion, normalize)


@fuse_scores.register_fake
def _(scores, candidates, weights, fusion, normalize):
    return _row_scores_fake(candidates, candidates.shape[0], candidates.shape[1])


@torch.library.custom_op("prunec::diversity_scores", mutates_args=())
def diversity_scores(hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """DivPrune's score form over the candidates (-pick step of the full greedy order): [B, S] fp32."""
    positions = _candidate_positions(candidates, n_candidates)
    features = _candidate_rows(hidden, positions)
    return _scatter(diversity_order_scores(features), positions, candidates.shape[1])


@diversity_scores.register_fake
def _(hidden, candidates, n_candidates):
    return _row_scores_fake(hidden, candidates.shape[0], candidates.shape[1])


def _scatter(values: torch.Tensor, positions: torch.Tensor, seq: int) -> torch.Tensor:
    out = values.new_zeros((values.shape[0], seq), dtype=torch.float32)
    return out.scatter_(1, positions, values.float())


@torch.library.custom_op("prunec::scatter_candidates", mutates_args=())
def scatter_candidates(values: torch.Tensor, candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[B, n_candidates] per-candidate values (e.g. per image patch) -> [B, S] at the candidates'
    positions, in order; 0 elsewhere."""
    return _scatter(values, _candidate_positions(candidates, n_candidates), candidates.shape[1])


@scatter_candidates.register_fake
def _(values, candidates, n_candidates):
    return _row_scores_fake(values, candidates.shape[0], candidates.shape[1])


@torch.library.custom_op("prunec::attention_scores", mutates_args=())
def attention_scores(method: str, params: str, qs: List[torch.Tensor], ks: List[torch.Tensor],
                     masks: List[Optional[torch.Tensor]], scales: List[float], is_causal: bool,
                     valid: Optional[torch.Tensor], candidates: Optional[torch.Tensor], vs: List[torch.Tensor],
                     prior: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, S_keys] fp32 scores of a registered full-attention-map method over the given layers' q/k
    (and v, for methods that read values); `params`: its JSON parameters; `candidates` when the
    keys are the site's sequence; `prior`: what an accumulating method's earlier stage left."""
    info = get_method(method)
    extra = json.loads(params)
    if vs:
        extra["values"] = vs
    if info.accumulates:
        extra["prior"] = prior
    return info.fn(qs, ks, masks, scales, is_causal, valid, candidates=candidates, **extra).float()


@attention_scores.register_fake
def _(method, params, qs, ks, masks, scales, is_causal, valid, candidates, vs, prior):
    return _row_scores_fake(qs[-1], qs[-1].shape[0], ks[-1].shape[-2])


@torch.library.custom_op("prunec::select_by_attention", mutates_args=())
def select_by_attention(method: str, params: str, qs: List[torch.Tensor], ks: List[torch.Tensor],
                        masks: List[Optional[torch.Tensor]], scales: List[float], is_causal: bool,
                        candidates: torch.Tensor, n_candidates: int, n_keep: int,
                        hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """A registered select method over attention maps (and, given `hidden`, the candidates'
    features): it picks among the last n_candidates keys (the candidates, in order); keeps every
    non-candidate; methods with `paired_text` also get the text's mean embedding."""
    positions = _candidate_positions(candidates, n_candidates)
    extra = json.loads(params)
    if hidden is not None:
        extra["features"] = _candidate_rows(hidden, positions)
        if get_method(method).paired_text:
            extra["text"] = _paired_texts(hidden, positions, 1)
    local = get_method(method).fn(qs, ks, masks, scales, is_causal, n_candidates, n_keep, **extra)
    return _keep_indices(candidates, positions, local)


@select_by_attention.register_fake
def _(method, params, qs, ks, masks, scales, is_causal, candidates, n_candidates, n_keep, hidden):
    return _keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::merge_candidates", mutates_args=())
def merge_candidates(method: str, params: str, hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int,
                     n_keep: int, qs: List[torch.Tensor], ks: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                     scales: List[float], is_causal: bool, pixels: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A registered merge method over the candidates' hidden states (and, if it reads them, attention
    maps and pixels): (sorted keep indices over the sequence, hidden states with each surviving
    candidate's row replaced by its merged value). Gathering the second by the first gives the merged
    sequence."""
    positions = _candidate_positions(candidates, n_candidates)
    features = _candidate_rows(hidden, positions)
    attention = (qs, ks, masks, scales, is_causal) if qs else ()
    extra = json.loads(params)
    if pixels is not None:
        extra["pixels"] = pixels
    local, merged = get_method(method).fn(features, n_keep, *attention, **extra)
    return _keep_indices(candidates, positions, local), _merged_back(hidden, positions, local, merged)


@merge_candidates.register_fake
def _(method, params, hidden, candidates, n_candidates, n_keep, qs, ks, masks, scales, is_causal, pixels):
    return _keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape)


@torch.library.custom_op("prunec::merge_by_scores", mutates_args=())
def merge_by_scores(method: str, params: str, hidden: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor,
                    n_candidates: int, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A registered merge method driven by per-token scores ([B, S]): like `merge_candidates`."""
    positions = _candidate_positions(candidates, n_candidates)
    features = _candidate_rows(hidden, positions)
    local, merged = get_method(method).fn(features, scores.gather(1, positions), n_keep, **json.loads(params))
    return _keep_indices(candidates, positions, local), _merged_back(hidden, positions, local, merged)


@merge_by_scores.register_fake
def _(method, params, hidden, scores, candidates, n_candidates, n_keep):
    return _keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape)


@torch.library.custom_op("prunec::tome_merge", mutates_args=())
def tome_merge(hidden: torch.Tensor, size: Optional[torch.Tensor], keys: torch.Tensor, candidates: torch.Tensor,
               n_candidates: int, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted bipartite merge: (keep indices, merged hidden, sizes), both full length;
    `size` None means every token stands for one."""
    _check_count(candidates, n_candidates)
    size = torch.ones(hidden.shape[:2], device=hidden.device) if size is None else size
    if use_triton(hidden, keys):
        from .kernels.bipartite_merge import bipartite_match, merge_into

        return _tome_merge(hidden, size, keys, candidates, n_keep, match=bipartite_match, merge=merge_into)
    return _tome_merge(hidden, size, keys, candidates, n_keep)


@tome_merge.register_fake
def _(hidden, size, keys, candidates, n_candidates, n_keep):
    batch, seq = candidates.shape
    return (_keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape),
            hidden.new_empty((batch, seq), dtype=torch.float32))


@torch.library.custom_op("prunec::text_raters", mutates_args=())
def text_raters(embeds: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """SparseVLM's rater tokens: [B, S] bool, from the LLM input embeddings."""
    return _text_raters(embeds, candidates)


@text_raters.register_fake
def _(embeds, candidates):
    return candidates.new_empty(candidates.shape)


@torch.library.custom_op("prunec::rater_attention", mutates_args=())
def rater_attention(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float, is_causal: bool,
                    raters: torch.Tensor) -> torch.Tensor:
    """Head-mean attention from the rater rows, averaged over them: [B, S] fp32."""
    return _rater_attention(q, k, mask, scale, is_causal, raters)


@rater_attention.register_fake
def _(q, k, mask, scale, is_causal, raters):
    return _row_scores_fake(q, raters.shape[0], raters.shape[1])


@torch.library.custom_op("prunec::drop_candidates", mutates_args=())
def drop_candidates(candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """Keep indices of every non-candidate: a stage that keeps none of its candidates."""
    _check_count(candidates, n_candidates)
    return _keep_indices(candidates, _candidate_positions(candidates, n_candidates),
                         candidates.new_empty((candidates.shape[0], 0), dtype=torch.long))


@drop_candidates.register_fake
def _(candidates, n_candidates):
    return _keep_shape(candidates, n_candidates, 0)


@torch.library.custom_op("prunec::select_by_features", mutates_args=())
def select_by_features(method: str, params: str, hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int,
                       n_keep: int, images: int) -> torch.Tensor:
    """A registered select method over the candidates' hidden states; keeps every non-candidate.
    With images > 1 it runs within each image (equal token counts, in order) with its own budget."""
    positions = _candidate_positions(candidates, n_candidates)
    features = _candidate_rows(hidden, positions)
    info = get_method(method)
    batch, per_image = features.shape[0], n_candidates // images
    text = (_paired_texts(hidden, positions, images),) if info.paired_text else ()
    local = info.fn(features.view(batch * images, per_image, -1), n_keep // images, *text, **json.loads(params))
    offsets = torch.arange(images, device=local.device)[:, None] * per_image
    return _keep_indices(candidates, positions, (local.view(batch, images, -1) + offsets).view(batch, n_keep))


def _paired_texts(hidden: torch.Tensor, positions: torch.Tensor, images: int) -> torch.Tensor:
    """[B * images, D] mean embedding of the tokens after each image up to the next image or the
    row's end (zeros where none): the text an image is paired with (left padding never follows it).
    positions: [B, N] the image tokens, `images` equal runs in order."""
    batch, n = positions.shape
    spans = positions.view(batch, images, n // images)
    ends = torch.cat([spans[:, 1:, 0], positions.new_full((batch, 1), hidden.shape[1])], dim=1)
    tokens = torch.arange(hidden.shape[1], device=hidden.device)
    after = (tokens > spans[..., -1:]) & (tokens < ends[..., None])  # [B, images, S]
    sums = torch.einsum("bis,bsd->bid", after.float(), hidden.float())
    return (sums / after.sum(dim=-1, keepdim=True).clamp(min=1)).flatten(0, 1)


@select_by_features.register_fake
def _(method, params, hidden, candidates, n_candidates, n_keep, images):
    return _keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::vision_importance", mutates_args=())
def vision_importance(qs: List[torch.Tensor], ks: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                      scales: List[float], is_causal: bool, candidates: torch.Tensor, n_candidates: int,
                      threshold: float, pixels: Optional[torch.Tensor], entropy_weight: float) -> torch.Tensor:
    """[B, S] fp32 VFlowOpt importance of each candidate at its position (0 elsewhere)."""
    _check_count(candidates, n_candidates)
    return importance_over_sequence(qs, ks, masks, scales, is_causal, candidates, n_candidates, threshold, pixels,
                                    entropy_weight)


@vision_importance.register_fake
def _(qs, ks, masks, scales, is_causal, candidates, n_candidates, threshold, pixels, entropy_weight):
    return _row_scores_fake(qs[0], candidates.shape[0], candidates.shape[1])


@torch.library.custom_op("prunec::scope_candidates", mutates_args=())
def scope_candidates(images: torch.Tensor, n_image_tokens: int, n_query: int, scope: str) -> torch.Tensor:
    """[B, S] bool: of the image tokens (`images`, n_image_tokens per row, the query image's n_query
    last), those of every image but the last (scope "context") or of the last ("query")."""
    positions = _candidate_positions(images, n_image_tokens)
    split = n_image_tokens - n_query
    chosen = positions[:, :split] if scope == "context" else positions[:, split:]
    return torch.zeros_like(images).scatter_(1, chosen, True)


@scope_candidates.register_fake
def _(images, n_image_tokens, n_query, scope):
    return torch.empty_like(images)


@torch.library.custom_op("prunec::image_context_scores", mutates_args=())
def image_context_scores(method: str, params: str, hidden: torch.Tensor, images: torch.Tensor, n_image_tokens: int,
                         n_query: int, valid: Optional[torch.Tensor], qs: List[torch.Tensor], ks: List[torch.Tensor],
                         masks: List[Optional[torch.Tensor]], scales: List[float], is_causal: bool) -> torch.Tensor:
    """[B, S] float32 scores of a registered image_context method (CATP stage 2)."""
    positions = _candidate_positions(images, n_image_tokens)
    return get_method(method).fn(hidden, positions, n_query, valid, qs, ks, masks, scales, is_causal,
                                 **json.loads(params)).float()


@image_context_scores.register_fake
def _(method, params, hidden, images, n_image_tokens, n_query, valid, qs, ks, masks, scales, is_causal):
    return hidden.new_empty(tuple(hidden.shape[:2]), dtype=torch.float32)
