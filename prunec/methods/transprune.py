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

import torch

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


register_method(MethodInfo(
    name="ttv",
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
