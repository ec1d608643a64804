"""ToMe: bipartite soft matching with size-weighted merging and proportional attention (ICLR 2023).

Official code (facebookresearch/ToMe, `tome/merge.py::bipartite_soft_matching`, `merge_wavg`,
`tome/patch/timm.py`): metric = the block's keys averaged over heads, L2-normalized; tokens split
by alternation into A (even) and B (odd), [CLS] protected; each A token's most similar B token;
the r A tokens with the best matches merge into their partners as a size-weighted average, and
sizes add; later blocks add log(size) to their attention logits (proportional attention).
prunec: A / B by sequence-position parity over the candidates (protected [CLS] / registers never
merge); r = candidates - n_keep, at most |A| per stage; ties go to the lower index. Deviations:
the merge runs after the site block (ToMe merges between a block's attention and its MLP), and
kept tokens stay in position order (ToMe reorders to [unmerged A, B], so from the second merging
layer on its A / B split differs).
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method


def _match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (a @ b.transpose(1, 2)).max(dim=-1)  # first (lowest) B on ties


def _merge(hidden, size, src_pos, dst_pos):
    width = hidden.shape[-1]
    weighted = hidden.float() * size[..., None]
    weighted = weighted.scatter_add(1, dst_pos[..., None].expand(-1, -1, width),
                                    weighted.gather(1, src_pos[..., None].expand(-1, -1, width)))
    new_size = size.float().scatter_add(1, dst_pos, size.float().gather(1, src_pos))
    return (weighted / new_size[..., None]).to(hidden.dtype), new_size


def tome_merge(hidden: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor,
               n_keep: int, match=_match, merge=_merge) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, S, D]; size [B, S] tokens each row represents; keys [B, H, S, hd] of the block;
    candidates [B, S] bool (same count per row). Returns (sorted keep indices [B, K], hidden with the
    destinations' rows merged, sizes likewise), K = S - (candidates - n_keep). `match` and `merge`
    are the two heavy steps, swappable for the Triton kernels (`prunec.kernels.bipartite_merge`)."""
    batch, seq, _ = hidden.shape
    positions = torch.arange(seq, device=hidden.device)
    n_a = int((candidates & (positions % 2 == 0)).sum(dim=1)[0])
    n_b = int((candidates & (positions % 2 == 1)).sum(dim=1)[0])
    a_pos = torch.where(candidates & (positions % 2 == 0))[1].view(batch, n_a)
    b_pos = torch.where(candidates & (positions % 2 == 1))[1].view(batch, n_b)
    r = int(candidates[0].sum()) - n_keep
    if r > n_a:
        raise ValueError(f"tome merges at most the {n_a} A tokens per stage, asked for {r}")
    metric = torch.nn.functional.normalize(keys.float().mean(dim=1), dim=-1)  # [B, S, hd]
    a = metric.gather(1, a_pos[..., None].expand(-1, -1, metric.shape[-1]))
    b = metric.gather(1, b_pos[..., None].expand(-1, -1, metric.shape[-1]))
    best, partner = match(a, b)
    src = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]
    src_pos, dst_pos = a_pos.gather(1, src), b_pos.gather(1, partner.gather(1, src))
    merged, new_size = merge(hidden, size, src_pos, dst_pos)
    keep = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device).scatter(1, src_pos, False)
    index = keep.nonzero()[:, 1].view(batch, seq - r)
    return index, merged, new_size


register_method(MethodInfo(
    name="tome",
    action="merge",
    kind="merge",
    signals=("attention_qk",),
    fn=tome_merge,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"proportional_attention": {"type": "boolean",
                                                  "description": "add log(size) to later attention logits (official)"}},
    },
    defaults={"proportional_attention": True},
    default_positions="keep_original",
    domains=("vision",),  # not text: padding would merge into words
    layer_sites_only=True,
    summary="bipartite matching on head-mean keys, size-weighted merge, proportional attention after",
    source="facebookresearch/ToMe tome/merge.py::bipartite_soft_matching, merge_wavg",
))
