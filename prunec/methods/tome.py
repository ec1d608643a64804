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

import operator
from typing import Optional, Tuple

import torch

from .. import ops
from ..adapters.base import module_path
from ..candidates import check_count, keep_shape
from ..kernels import use_triton
from ..lowering import Selection
from ..signals import sdpa_args
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


@torch.library.custom_op("prunec::tome_merge", mutates_args=())
def tome_merge_op(hidden: torch.Tensor, size: Optional[torch.Tensor], keys: torch.Tensor, candidates: torch.Tensor,
               n_candidates: int, n_keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted bipartite merge: (keep indices, merged hidden, sizes), both full length;
    `size` None means every token stands for one."""
    check_count(candidates, n_candidates)
    size = torch.ones(hidden.shape[:2], device=hidden.device) if size is None else size
    if use_triton(hidden, keys):
        from ..kernels.bipartite_merge import bipartite_match, merge_into

        return tome_merge(hidden, size, keys, candidates, n_keep, match=bipartite_match, merge=merge_into)
    return tome_merge(hidden, size, keys, candidates, n_keep)


@tome_merge_op.register_fake
def _(hidden, size, keys, candidates, n_candidates, n_keep):
    batch, seq = candidates.shape
    return (keep_shape(candidates, n_candidates, n_keep), hidden.new_empty(hidden.shape),
            hidden.new_empty((batch, seq), dtype=torch.float32))

ops.keep_index_op("tome_merge")


def _lower_select(b) -> Selection:
    """Size-weighted merge on the layer's keys; sizes carry to the domain's next stage of this method
    and, with proportional attention, bias the attention of the layers up to it."""
    key = (b.stage.domain, "tome:size")
    attention = b.signal("attention_qk")
    merge = b.add("select", torch.ops.prunec.tome_merge.default,
                  (b.record.site_value, b.carried.get(key), attention.k, b.candidates, *b.sizes))
    index = b.add("select", operator.getitem, (merge, 0))
    source = b.add("select", operator.getitem, (merge, 1), meta_from=b.record.site_value)
    size = b.rows(b.add("select", operator.getitem, (merge, 2)))  # full length: propagate_tokens gathers it
    b.carried[key] = size
    if b.stage.param_dict["proportional_attention"]:
        _proportional_attention(b, size)
    return Selection(index, source)


def _proportional_attention(b, size) -> None:
    """Add log(size) to the attention logits of the domain's later layers, up to the next stage of
    this method (which adds its own sizes)."""
    stage, graph = b.stage, b.graph
    later = [s.layer for s in b.later_stages() if s.domain == stage.domain and s.method == stage.method]
    domain = b.ctx.adapter.domains()[stage.domain]

    def make(target, args, kwargs=None):
        node = graph.call_function(target, args, kwargs or {})
        node.meta["prunec_role"] = "score"
        return node

    for layer in range(stage.layer + 1, min(later, default=domain.num_layers - 1) + 1):
        for node in [n for n in graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
                     and f"{domain.layers_path}.{layer}." in module_path(n) + "."]:
            mask = sdpa_args(node).get("attn_mask")
            with graph.inserting_before(node):
                bias = make(torch.ops.aten.log.default, (size,))
                bias = make(torch.ops.aten.unsqueeze.default, (make(torch.ops.aten.unsqueeze.default, (bias, 1)), 1))
                bias = make(torch.ops.aten._to_copy.default, (bias,), {"dtype": node.args[0].meta["val"].dtype})
                if mask is not None and mask.meta["val"].dtype == torch.bool:
                    bias = make(torch.ops.aten.masked_fill.Scalar,
                                (bias, make(torch.ops.aten.logical_not.default, (mask,)), float("-inf")))
                elif mask is not None:
                    bias = make(torch.ops.aten.add.Tensor, (mask, bias))
            if "attn_mask" in node.kwargs:
                node.kwargs = {**node.kwargs, "attn_mask": bias}
            else:
                args = list(node.args) + [None] * (4 - len(node.args))
                args[3] = bias
                node.args = tuple(args)


def _check_budget(params: dict, available: int, n_keep: int, adapter, protect, images: int
                  ) -> tuple[str, str] | None:
    """Bipartite matching merges only A tokens (even positions among the candidates, which follow the
    protected leading tokens), each into one B token: at most |A| per stage."""
    first = adapter.leading_tokens() if "cls" in protect else 0
    n_a = (first + available + 1) // 2 - (first + 1) // 2
    if available - n_keep > n_a:
        return (f"tome merges at most {n_a} of {available} tokens in one stage (one per A token of the bipartite "
                f"split), asked to merge {available - n_keep}; spread the reduction over more layers", "keep")
    return None


register_method(MethodInfo(
    name="tome",
    lower_select=_lower_select,
    check_budget=_check_budget,
    kernel=True,
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
