"""TransPrune: token transition variation (TTV) plus instruction-guided attention (IGA) (CVPR 2026).

Official code (liaolea/TransPrune, `modeling_llama_transprune.py`):
- TTV of a sub-block F (attention or FFN) with normalized input T_in (`input_layernorm(x)`, resp.
  `post_attention_layernorm(h)`) and output T_out (before the residual add):
  `softmax_tokens(1 - cos(T_in, T_out)) * |T_out| / |T_in|`; per layer TTV(attn) + TTV(FFN);
  summed over the accumulating layers up to the pruning layer (`compute_transf_weight`). The code
  uses the signed cosine (`cos: signed`); the paper writes 1 - |cos| (`cos: abs`).
- IGA: the next layer's q/k recomputed on the current hidden states; queries are the instruction
  tokens after the image, keys every token under the causal mask; softmax, mean over heads and over
  the instruction rows (`transprune_rank_drop`).
- Score: TTV and IGA each normalized to sum 1 over the current image tokens, then added (alpha =
  0.5). In prunec that is `method: fuse` with `fusion: weighted_sum, normalize: sum` over the
  registered scores `ttv` and `iga` (specs/transprune-high.yaml); TTV alone is one term.

Batch: the official code runs batch 1 and its softmax spans the whole sequence. Here the softmax runs
over each row's valid tokens (padding excluded, its TTV is 0), which equals the official value for
an unpadded row and keeps a padded row's scores independent of its padding.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..candidates import row_scores_fake
from ..kernels import use_triton
from . import MethodInfo, register_method
from .attention_maps import rows_attention

_EPS = 1e-12


def token_transition(x_in: torch.Tensor, x_out: torch.Tensor, valid: torch.Tensor | None = None,
                     cos: str = "signed") -> torch.Tensor:
    """TTV of one sub-block: [B, S, D] input and output (and [B, S] bool valid tokens) -> [B, S] fp32."""
    a, c = x_in.float(), x_out.float()
    norm_in, norm_out = a.norm(dim=-1), c.norm(dim=-1)
    cosine = (a * c).sum(-1) / (norm_in * norm_out).clamp(min=_EPS)
    turn = 1.0 - (cosine.abs() if cos == "abs" else cosine)
    ratio = norm_out / norm_in.clamp(min=_EPS)
    if valid is not None:
        turn = turn.masked_fill(~valid, float("-inf"))
        ratio = ratio.masked_fill(~valid, 0.0)
    return torch.softmax(turn, dim=-1) * ratio


def instruction_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float,
                          is_causal: bool, candidates: torch.Tensor) -> torch.Tensor:
    """IGA: head-mean attention each key receives from the instruction rows, averaged over them.

    Args:
        q: [B, H, S, hd] queries after RoPE for every position; k: [B, H or H_kv, S, hd].
        mask, scale, is_causal: as the layer's sdpa call receives them.
        candidates: [B, S] bool; the instruction rows of a row are the tokens after its last
            candidate (LLaVA: the prompt text after the image).
    Returns: [B, S] float32; a row with no instruction token scores 0 everywhere.
    """
    positions = torch.arange(q.shape[-2], device=q.device)
    last_candidate = torch.where(candidates, positions, -1).amax(dim=1, keepdim=True)  # [B, 1]
    return rows_attention(q, k, mask, scale, is_causal, positions[None, :] > last_candidate)


@torch.library.custom_op("prunec::token_transition", mutates_args=())
def token_transition_op(x_in: torch.Tensor, x_out: torch.Tensor, valid: Optional[torch.Tensor], cos: str) -> torch.Tensor:
    """TransPrune's TTV of one sub-block: [B, S] fp32, softmax over each row's valid tokens."""
    if use_triton(x_in, x_out):
        from ..kernels.token_transition import token_transition as kernel

        return kernel(x_in, x_out, valid, abs_cos=cos == "abs")
    return token_transition(x_in, x_out, valid, cos)


@token_transition_op.register_fake
def _(x_in, x_out, valid, cos):
    return row_scores_fake(x_in, x_in.shape[0], x_in.shape[1])


@torch.library.custom_op("prunec::instruction_attention", mutates_args=())
def instruction_attention_op(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                          is_causal: bool, candidates: torch.Tensor) -> torch.Tensor:
    """TransPrune's IGA: head-mean attention from the rows after the last candidate, row-averaged."""
    return instruction_attention(q, k, mask, scale, is_causal, candidates)


@instruction_attention_op.register_fake
def _(q, k, mask, scale, is_causal, candidates):
    return row_scores_fake(q, candidates.shape[0], candidates.shape[1])

def _ttv_scores(b, method, params):
    """TTV summed over the stage's sub-blocks, on top of what the domain's earlier stage summed
    (carried, gathered to this stage's tokens by propagate_tokens)."""
    key = (b.stage.domain, f"accumulated:{method}")
    total = b.carried.get(key)
    for block_in, block_out in b.signal("transitions", method):
        ttv = b.add("score", torch.ops.prunec.token_transition.default, (block_in, block_out, b.valid, params["cos"]))
        total = ttv if total is None else b.add("score", torch.ops.aten.add.Tensor, (total, ttv))
        b.rows(total)
    b.carried[key] = total
    return total


def _iga_scores(b, method, params):
    a = b.signal("instruction_qk", method)
    return b.add("score", torch.ops.prunec.instruction_attention.default,
                 (a.q, a.k, a.mask, a.scale, a.causal, b.candidates))


register_method(MethodInfo(
    name="ttv",
    lower_scores=_ttv_scores,
    kernel=True,
    rounding="floor",
    rounding_source="official: int(N * ratio)",
    action="prune",
    kind="score",
    signals=("transitions",),
    accumulates=True,
    layer_params=("accumulate_from",),
    fn=token_transition,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "accumulate_from": {"type": "integer", "minimum": 0,
                                "description": "first layer (0-indexed) whose TTV is summed; default: the "
                                               "site layer only. TransPrune on LLaVA-1.5: 6 (layers 7-12 1-indexed)"},
            "cos": {"enum": ["signed", "abs"],
                    "description": "signed = official code (1 - cos); abs = paper (1 - |cos|)"},
        },
    },
    defaults={"cos": "signed"},
    default_positions="renumber",
    domains=("llm",),
    layer_sites_only=True,
    summary="TransPrune token transition variation: sub-block norm ratio x softmax(1 - cos), summed over layers",
    source="liaolea/TransPrune llava/model/modeling_llama_transprune.py::compute_transf_weight",
    variants={"cos": "signed (code) / abs (paper)"},
))

register_method(MethodInfo(
    name="iga",
    lower_scores=_iga_scores,
    rounding="floor",
    rounding_source="official: int(N * ratio)",
    action="prune",
    kind="score",
    signals=("instruction_qk",),
    fn=instruction_attention,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    domains=("llm",),
    layer_sites_only=True,
    summary="TransPrune instruction-guided attention: next layer's recomputed q/k, instruction rows, head mean",
    source="liaolea/TransPrune llava/model/modeling_llama_transprune.py::transprune_rank_drop",
))
