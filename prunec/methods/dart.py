"""DART: keep the image tokens least duplicated with a few pivot tokens (EMNLP 2025, arXiv 2502.11494).

Official code (ZichenWen1/DART `modeling_llama_self.py::DART.get_retained_image_token`, read through
METHODS-2.md §2): at the input of LLM layer K (prunec site `llm.layers[K-1]`, official K = 2), pivots
are the `pivots_image` image tokens and the `pivots_text` tokens after the image with the largest L1
norm of layer K-1's post-RoPE keys (heads concatenated); the hidden states entering layer K go
through the model's *final* norm; for each pivot in turn (the iteration order of the Python set the
official code builds from the pivots' positions, image pivots first), the `TOPK` remaining image
tokens least cosine-similar to it join the kept set and leave the pool. Kept: the image pivots and
every pick; the text pivots stay as text. Positions: the kept tokens keep their original positions.

Budget, as the official code computes it: `TOPK = floor(requested / (pivots_image + pivots_text))`
with `requested` = the count (LLaVA-1.5's `max_num_trunction`) or ratio x image tokens (Qwen2.5-VL's
path), and `pivots_image + (pivots_image + pivots_text) x TOPK` tokens are kept: 64/128/192 keep
68/132/196 on LLaVA-1.5.

Rows: the positions in the set are a row's positions counted from its first real token, so a left-
padded row orders its pivots as it does alone (the official code runs batch 1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..candidates import candidate_positions, keep_indices, keep_shape
from ..lowering import Selection
from . import MethodInfo, register_method


def dart_kept(params: dict, requested: float) -> int:
    """pivots_image + (pivots_image + pivots_text) x floor(requested / (pivots_image + pivots_text))"""
    pivots = params["pivots_image"] + params["pivots_text"]
    return params["pivots_image"] + pivots * int(requested // pivots)


def dart_row(key_norms: torch.Tensor, normed: torch.Tensor, image: list[int], query: list[int],
             pivots_image: int, pivots_text: int, per_pivot: int) -> list[int]:
    """One row. key_norms: [S] L1 norms of the keys; normed: [S, D] hidden states through the final
    norm; image: the candidates' positions, query: the positions after the image (both counted from
    the row's first real token, which is how they are indexed here). Returns the kept image positions, sorted."""
    def top(positions: list[int], k: int) -> list[int]:
        order = torch.sort(key_norms[positions], descending=True, stable=True).indices[:k]
        return [positions[i] for i in order.tolist()]

    image_pivots, text_pivots = top(image, pivots_image), top(query, pivots_text)
    kept = set(image_pivots + text_pivots)
    pool = set(image) - set(image_pivots)
    pool_list = list(pool)
    for pivot in list(kept):  # the Python set's order, as the official loop
        distance = -torch.nn.functional.cosine_similarity(normed[pivot], normed[pool_list], dim=-1)
        picks = [pool_list[i] for i in distance.topk(per_pivot).indices.tolist()]
        kept.update(picks)
        pool.difference_update(picks)
        pool_list = list(pool)
    kept.difference_update(text_pivots)
    return sorted(kept)


@torch.library.custom_op("prunec::select_dart", mutates_args=())
def select_dart(keys: torch.Tensor, normed: torch.Tensor, candidates: torch.Tensor, valid: Optional[torch.Tensor],
                n_candidates: int, n_keep: int, pivots_image: int, pivots_text: int) -> torch.Tensor:
    """keys [B, H, S, hd] (post-RoPE), normed [B, S, D]: DART's kept candidates plus every non-candidate."""
    positions = candidate_positions(candidates, n_candidates)
    per_pivot = (n_keep - pivots_image) // (pivots_image + pivots_text)
    norms = keys.float().abs().sum(dim=(1, 3))  # [B, S]: L1 over heads x head_dim
    local_rows = []
    for b in range(candidates.shape[0]):
        first = int(valid[b].int().argmax()) if valid is not None else 0  # left padding before it
        image = (positions[b] - first).tolist()
        query = list(range(image[-1] + 1, candidates.shape[1] - first))
        if len(query) < pivots_text:
            raise ValueError(f"prunec: DART takes {pivots_text} text pivots from the tokens after the image, and row "
                             f"{b} has {len(query)} there")
        kept = dart_row(norms[b, first:], normed[b, first:].float(), image, query, pivots_image, pivots_text,
                        per_pivot)
        local_rows.append(torch.tensor([image.index(p) for p in kept], device=candidates.device))
    return keep_indices(candidates, positions, torch.stack(local_rows))


@select_dart.register_fake
def _(keys, normed, candidates, valid, n_candidates, n_keep, pivots_image, pivots_text):
    return keep_shape(candidates, n_candidates, n_keep)


ops.keep_index_op("select_dart")


def _lower_select(b) -> Selection:
    params = b.stage.param_dict
    return Selection(b.add("select", torch.ops.prunec.select_dart.default,
                           (b.signal("attention_qk").k, b.signal("final_norm_hidden"), b.candidates, b.valid,
                            *b.sizes, params["pivots_image"], params["pivots_text"])))


def _check_budget(params, available, n_keep, adapter, protect, images):
    pivots = params["pivots_image"] + params["pivots_text"]
    if n_keep < params["pivots_image"] or (n_keep - params["pivots_image"]) % pivots:
        return (f"DART keeps its {params['pivots_image']} image pivots plus {pivots} x TOPK tokens, so not "
                f"{n_keep}", "keep")
    return None


register_method(MethodInfo(
    name="dart",
    action="prune",
    kind="select",
    signals=("attention_qk", "final_norm_hidden"),
    fn=dart_row,
    lower_select=_lower_select,
    check_budget=_check_budget,
    kept_count=dart_kept,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "pivots_image": {"type": "integer", "minimum": 1,
                             "description": "image pivots: the image tokens with the largest key L1 norm"},
            "pivots_text": {"type": "integer", "minimum": 1,
                            "description": "text pivots: the tokens after the image with the largest key L1 norm"},
        },
    },
    defaults={"pivots_image": 4, "pivots_text": 4},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="pivots by key L1 norm (layer K-1), keep the image tokens least cosine-similar to each pivot "
            "(final-norm hidden states)",
    source="ZichenWen1/DART llava/model/language_model/modeling_llama_self.py::DART.get_retained_image_token",
    variants={"budget": "count M keeps p_img + 8 floor(M / 8) (official LLaVA) / ratio r: p_img + 8 floor(r N / 8) "
                        "(official Qwen2.5-VL, LightCompress)"},
    rounding="floor",
    rounding_source="official: TOKEN_TOPK = ceil(M // (pivot_image + pivot_text)), kept = pivots + 8 x TOKEN_TOPK",
))
