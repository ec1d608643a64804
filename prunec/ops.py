"""Pruning ops as torch.library custom ops in the `prunec` namespace.

These are the generic ops, shared by every method: a method-specific op (one with a Triton kernel
of its own, say) lives in its method's file. Each op has a fake implementation, so it survives
torch.export and torch.compile. On CUDA tensors (with Triton installed) `attention_received`,
`select_topk` and the gathers run Triton kernels (`prunec/kernels/`); everywhere else torch.
Ops that call a registered method's function take its name: an artifact records a hash of each
method's code in its lock, and `prunec.load` refuses one whose methods changed (`prunec/provenance.py`).
Selection ops return sorted keep indices over the whole sequence: every non-candidate token plus the
kept candidates, so all rows keep the same count.
"""
from __future__ import annotations

import json
from typing import List, Optional, Tuple

import torch

from .attention import attention_received as _attention_received
from .attention import reduce_rows
from .candidates import (candidate_positions, candidate_rows, check_count, keep_indices, keep_shape, merged_back,
                         row_scores_fake, scatter_rows)
from .kernels import use_triton

# ops whose output (or first output, for merges) is a stage's [B, K] keep indices, for tools that
# trace an emitted module's selections (keep-maps); method files that define their own selection op
# add it with `keep_index_op`
KEEP_INDEX_OPS = {"select_topk", "select_topk_per_image", "select_by_attention", "select_by_features", "drop_candidates", "merge_candidates",
                  "merge_by_scores", "select_topk_rows", "drop_candidates_rows"}


def keep_index_op(name: str) -> None:
    KEEP_INDEX_OPS.add(name)


def _method(name: str):
    from .methods import get_method  # the registry imports this module's ops

    return get_method(name)


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

        check_count(candidates, n_candidates)
        return topk_spans(scores.float(), candidates, n_candidates, n_keep)
    positions = candidate_positions(candidates, n_candidates)
    cand_scores = scores.float().gather(1, positions)
    order = torch.sort(cand_scores, dim=1, descending=True, stable=True).indices
    return keep_indices(candidates, positions, order[:, :n_keep])


@select_topk.register_fake
def _(scores, candidates, n_candidates, n_keep):
    return keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::select_topk_per_image", mutates_args=())
def select_topk_per_image(scores: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int,
                          images: int) -> torch.Tensor:
    """`select_topk` within each image (`scope: per_image`): the candidates are `images` equal runs in
    order, each keeps its n_keep / images highest-scoring tokens (ties: lower index)."""
    positions = candidate_positions(candidates, n_candidates)
    batch, per_image = positions.shape[0], n_candidates // images
    cand_scores = scores.float().gather(1, positions).view(batch, images, per_image)
    order = torch.sort(cand_scores, dim=2, descending=True, stable=True).indices[:, :, :n_keep // images]
    offsets = torch.arange(images, device=order.device)[:, None] * per_image
    return keep_indices(candidates, positions, (order + offsets).flatten(1))


@select_topk_per_image.register_fake
def _(scores, candidates, n_candidates, n_keep, images):
    return keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, index: torch.Tensor, dims: List[int], batch_dim: int = 0) -> torch.Tensor:
    """Apply [B, K] keep indices along each token axis in `dims`. `batch_dim` is the batch axis (size
    B, or 1 to broadcast): 0 for [B, S, D] hidden states, 1 for a [3, B, S, d] mRoPE table."""
    first, token_dims = _batch_first(x, dims, batch_dim)
    if first.shape[0] != index.shape[0]:
        first = first.expand(index.shape[0], *first.shape[1:])
    if use_triton(first, index):
        from .kernels.gather import gather_rows

        out = first
        for dim in token_dims:  # the kernel gathers dim 1; move each token axis there and back
            out = gather_rows(out.movedim(dim, 1), index).movedim(1, dim)
    else:
        out = _gather_torch(first, index, token_dims)
    return out.movedim(0, batch_dim).contiguous()


def _batch_first(x: torch.Tensor, dims: List[int], batch_dim: int) -> tuple[torch.Tensor, List[int]]:
    """`x` with its batch axis moved to dim 0, and the token axes renumbered to match."""
    if batch_dim == 0:
        return x, list(dims)
    return x.movedim(batch_dim, 0), [d + 1 if d < batch_dim else d for d in dims]


def _gather_torch(x: torch.Tensor, index: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """Batch-first `x` (dim 0 of size B or 1) gathered along `dims`."""
    batch, kept = index.shape
    out = x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x
    for dim in dims:
        view = [batch] + [1] * (out.dim() - 1)
        view[dim] = kept
        shape = list(out.shape)
        shape[dim] = kept
        out = out.gather(dim, index.view(view).expand(shape))
    return out.clone() if out is x else out


def _gathered_like(x, index, dims, batch_dim=0):
    shape = list(x.shape)
    shape[batch_dim] = index.shape[0]
    for dim in dims:
        shape[dim] = index.shape[1]
    return x.new_empty(shape)


@gather_tokens.register_fake
def _(x, index, dims, batch_dim=0):
    return _gathered_like(x, index, dims, batch_dim)


@torch.library.custom_op("prunec::renumber_positions", mutates_args=())
def renumber_positions(positions: torch.Tensor, kept: int, dims: List[int]) -> torch.Tensor:
    """Position ids for a pruned sequence of `kept` tokens, as if it had been the input: along the
    token axis `dims[0]`, each row's first position, then one more per token."""
    (dim,) = dims
    shape = [1] * positions.dim()
    shape[dim] = kept
    steps = torch.arange(kept, device=positions.device, dtype=positions.dtype).view(shape)
    return (positions.narrow(dim, 0, 1) + steps).contiguous()


@renumber_positions.register_fake
def _(positions, kept, dims):
    shape = list(positions.shape)
    shape[dims[0]] = kept
    return positions.new_empty(shape)


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


@torch.library.custom_op("prunec::flag_tokens", mutates_args=())
def flag_tokens(tokens: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: of the `tokens` (True entries, in row-major order), those whose entry in `flags`
    (one per token, e.g. an image layout's newline marks) is negative."""
    return torch.zeros_like(tokens).masked_scatter(tokens, flags < 0)


@flag_tokens.register_fake
def _(tokens, flags):
    return torch.empty_like(tokens)


@torch.library.custom_op("prunec::layout_scores", mutates_args=())
def layout_scores(patches: torch.Tensor, images: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """[B, S] fp32: each image token (`images`, row-major) gets the value of the crop patch its
    `layout` entry names in the flattened [crops, patches] `patches`; 0 for a newline (-1)."""
    flat = patches.flatten().float()
    values = torch.where(layout < 0, 0.0, flat[layout.clamp(min=0)])
    return torch.zeros(images.shape, dtype=torch.float32, device=images.device).masked_scatter(images, values)


@layout_scores.register_fake
def _(patches, images, layout):
    return images.new_empty(images.shape, dtype=torch.float32)


@torch.library.custom_op("prunec::prefix_mask", mutates_args=())
def prefix_mask(x: torch.Tensor, protect_last: int) -> torch.Tensor:
    """[B, S] bool, True before the last `protect_last` tokens: the candidates of a text sequence."""
    positions = torch.arange(x.shape[1], device=x.device)
    return (positions < x.shape[1] - protect_last).expand(x.shape[0], -1).clone()


@prefix_mask.register_fake
def _(x, protect_last):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.bool)


@torch.library.custom_op("prunec::scatter_candidates", mutates_args=())
def scatter_candidates(values: torch.Tensor, candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[B, n_candidates] per-candidate values (e.g. per image patch) -> [B, S] at the candidates'
    positions, in order; 0 elsewhere. n_candidates = -1: rows hold different counts, and `values`
    ([images, patches]) follows the candidates in row-major order (the images in pixel order)."""
    if n_candidates < 0:
        flat = candidates.flatten().nonzero()[:, 0]
        out = values.new_zeros(candidates.numel(), dtype=torch.float32)
        return out.scatter_(0, flat, values.flatten().float()).view(candidates.shape)
    return scatter_rows(values, candidate_positions(candidates, n_candidates), candidates.shape[1])


@scatter_candidates.register_fake
def _(values, candidates, n_candidates):
    return row_scores_fake(values, candidates.shape[0], candidates.shape[1])


@torch.library.custom_op("prunec::attention_scores", mutates_args=())
def attention_scores(method: str, params: str, qs: List[torch.Tensor], ks: List[torch.Tensor],
                     masks: List[Optional[torch.Tensor]], scales: List[float], is_causal: bool,
                     valid: Optional[torch.Tensor], candidates: Optional[torch.Tensor], vs: List[torch.Tensor],
                     prior: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, S_keys] fp32 scores of a registered full-attention-map method over the given layers' q/k
    (and v, for methods that read values); `params`: its JSON parameters; `candidates` when the
    keys are the site's sequence; `prior`: what an accumulating method's earlier stage left."""
    info = _method(method)
    extra = json.loads(params)
    if vs:
        extra["values"] = vs
    if info.accumulates:
        extra["prior"] = prior
    return info.fn(qs, ks, masks, scales, is_causal, valid, candidates=candidates, **extra).float()


@attention_scores.register_fake
def _(method, params, qs, ks, masks, scales, is_causal, valid, candidates, vs, prior):
    return row_scores_fake(qs[-1], qs[-1].shape[0], ks[-1].shape[-2])


@torch.library.custom_op("prunec::select_by_attention", mutates_args=())
def select_by_attention(method: str, params: str, qs: List[torch.Tensor], ks: List[torch.Tensor],
                        masks: List[Optional[torch.Tensor]], scales: List[float], is_causal: bool,
                        candidates: torch.Tensor, n_candidates: int, n_keep: int,
                        hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """A registered select method over attention maps (and, given `hidden`, the candidates'
    features): it picks among the last n_candidates keys (the candidates, in order); keeps every
    non-candidate; methods with `paired_text` also get the text's mean embedding."""
    positions = candidate_positions(candidates, n_candidates)
    extra = json.loads(params)
    if hidden is not None:
        extra["features"] = candidate_rows(hidden, positions)
        if _method(method).paired_text:
            extra["text"] = _paired_texts(hidden, positions, 1)
    local = _method(method).fn(qs, ks, masks, scales, is_causal, n_candidates, n_keep, **extra)
    return keep_indices(candidates, positions, local)


@select_by_attention.register_fake
def _(method, params, qs, ks, masks, scales, is_causal, candidates, n_candidates, n_keep, hidden):
    return keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::merge_candidates", mutates_args=())
def merge_candidates(method: str, params: str, hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int,
                     n_keep: int, qs: List[torch.Tensor], ks: List[torch.Tensor], masks: List[Optional[torch.Tensor]],
                     scales: List[float], is_causal: bool, pixels: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A registered merge method over the candidates' hidden states (and, if it reads them, attention
    maps and pixels): (sorted keep indices over the sequence, hidden states with each surviving
    candidate's row replaced by its merged value). Gathering the second by the first gives the merged
    sequence."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    attention = (qs, ks, masks, scales, is_causal) if qs else ()
    extra = json.loads(params)
    if pixels is not None:
        extra["pixels"] = pixels
    local, merged = _method(method).fn(features, n_keep, *attention, **extra)
    return keep_indices(candidates, positions, local), merged_back(hidden, positions, local, merged)


@merge_candidates.register_fake
def _(method, params, hidden, candidates, n_candidates, n_keep, qs, ks, masks, scales, is_causal, pixels):
    return keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape)


@torch.library.custom_op("prunec::merge_by_scores", mutates_args=())
def merge_by_scores(method: str, params: str, hidden: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor,
                    n_candidates: int, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A registered merge method driven by per-token scores ([B, S]): like `merge_candidates`."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    local, merged = _method(method).fn(features, scores.gather(1, positions), n_keep, **json.loads(params))
    return keep_indices(candidates, positions, local), merged_back(hidden, positions, local, merged)


@merge_by_scores.register_fake
def _(method, params, hidden, scores, candidates, n_candidates, n_keep):
    return keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape)


@torch.library.custom_op("prunec::drop_candidates", mutates_args=())
def drop_candidates(candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """Keep indices of every non-candidate: a stage that keeps none of its candidates."""
    check_count(candidates, n_candidates)
    return keep_indices(candidates, candidate_positions(candidates, n_candidates),
                         candidates.new_empty((candidates.shape[0], 0), dtype=torch.long))


@drop_candidates.register_fake
def _(candidates, n_candidates):
    return keep_shape(candidates, n_candidates, 0)


@torch.library.custom_op("prunec::select_by_features", mutates_args=())
def select_by_features(method: str, params: str, hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int,
                       n_keep: int, images: int) -> torch.Tensor:
    """A registered select method over the candidates' hidden states; keeps every non-candidate.
    With images > 1 it runs within each image (equal token counts, in order) with its own budget."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    info = _method(method)
    batch, per_image = features.shape[0], n_candidates // images
    text = (_paired_texts(hidden, positions, images),) if info.paired_text else ()
    local = info.fn(features.view(batch * images, per_image, -1), n_keep // images, *text, **json.loads(params))
    offsets = torch.arange(images, device=local.device)[:, None] * per_image
    return keep_indices(candidates, positions, (local.view(batch, images, -1) + offsets).view(batch, n_keep))


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
    return keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::scope_candidates", mutates_args=())
def scope_candidates(images: torch.Tensor, n_image_tokens: int, n_query: int, scope: str) -> torch.Tensor:
    """[B, S] bool: of the image tokens (`images`, n_image_tokens per row, the query image's n_query
    last), those of every image but the last (scope "context") or of the last ("query")."""
    positions = candidate_positions(images, n_image_tokens)
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
    positions = candidate_positions(images, n_image_tokens)
    return _method(method).fn(hidden, positions, n_query, valid, qs, ks, masks, scales, is_causal,
                                 **json.loads(params)).float()


@image_context_scores.register_fake
def _(method, params, hidden, images, n_image_tokens, n_query, valid, qs, ks, masks, scales, is_causal):
    return hidden.new_empty(tuple(hidden.shape[:2]), dtype=torch.float32)


@torch.library.custom_op("prunec::method_scores", mutates_args=())
def method_scores(method: str, params: str, candidates: torch.Tensor, inputs: List[torch.Tensor]) -> torch.Tensor:
    """[B, S] fp32 scores of a registered score method called on its signals' tensors in declared
    order (`fn(*inputs, **params)`): the lowering of any score method without one of its own."""
    scores = _method(method).fn(*inputs, **json.loads(params)).float()
    if tuple(scores.shape) != tuple(candidates.shape):
        raise ValueError(f"prunec: method {method} returned scores of shape {tuple(scores.shape)}, expected "
                         f"{tuple(candidates.shape)} (one per token)")
    return scores


@method_scores.register_fake
def _(method, params, candidates, inputs):
    return row_scores_fake(candidates, candidates.shape[0], candidates.shape[1])


from . import ragged as _ragged  # noqa: E402,F401  (run-time budget ops)
from . import methods as _registry  # noqa: E402,F401  (method files define their own ops; load them with these)
