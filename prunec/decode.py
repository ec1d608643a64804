"""Generation programs: a prefill that also returns each decoder layer's kept K/V, and a decode step.

The prefill is the rewritten prompt graph with more outputs: per decoder layer, the key and value
its attention call received (after RoPE, before GQA repetition) and which of those keys are real
tokens (the last query's mask row). A layer after a pruning site therefore hands back a shorter
cache. The decode step runs the model's own decoder layers on one new token per row against those
per-layer caches (each of its own length), and returns the logits and the new token's K/V.

Decode policy `static` (FastV's KV-cache variant, PyramidDrop): prune once at prefill; generated
tokens are never pruned. A new token continues the positions the last decoder layer uses: its
position is the prompt's last token's final position + 1, i.e. `seq_len - position_offset` for the
first new token, where the offset counts the tokens dropped up to the last `renumber` stage
(`keep_original`: the next position after the original prompt; `renumber`: shifted by the number
dropped, as PyramidDrop and TransPrune do).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.export import Dim

from .adapters.base import batch_dim, module_paths
from .capture import reexport
from .context import CompileContext
from .errors import BuildError, first_line
from .spec import Plan

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_VIEWS = {torch.ops.aten.reshape.default, torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default,
          torch.ops.aten.clone.default, torch.ops.aten.view.default}


def cache_lengths(plan: Plan) -> list[int]:
    """Entries each decoder layer's cache holds after prefill, per row, at the spec's inputs."""
    from .flops import domain_lengths

    return [tokens for tokens, _ in domain_lengths(plan, "llm")]


def kv_cache_bytes(plan: Plan, lengths: list[int]) -> int:
    """K and V of every layer for one row: 2 x entries x kv_heads x head_dim x element size."""
    _, d_kv = plan.adapter.attention_dims("llm")
    element = torch.empty((), dtype=getattr(torch, plan.lock["model"].get("dtype", "float32"))).element_size()
    return sum(2 * n * d_kv * element for n in lengths)


def _unrepeated(node: fx.Node) -> fx.Node:
    """Walk back through the view/expand chain GQA repetition adds, to the [B, H_kv, S, hd] tensor."""
    while node.op == "call_function" and node.target in _VIEWS and node.args[0].meta["val"].ndim >= 4:
        node = node.args[0]
    return node


def _layer_attention(gm: fx.GraphModule, layers_path: str, n_layers: int) -> list[fx.Node]:
    calls = []
    for layer in range(n_layers):
        prefix = f"{layers_path}.{layer}"
        sdpa = [n for n in gm.graph.nodes if n.target is _SDPA and prefix in module_paths(n)]
        if len(sdpa) != 1:
            raise BuildError(f"decode: expected one attention call in {prefix}, found {len(sdpa)}")
        calls.append(sdpa[0])
    return calls


def export_prefill(gm: fx.GraphModule, ctx: CompileContext) -> torch.export.ExportedProgram:
    """The rewritten graph, returning (logits, keys..., values..., key validity...) per layer.
    Takes the compiler's final GraphModule and adds outputs to it."""
    domain = ctx.adapter.domains()["llm"]
    graph = gm.graph  # changed in place: the artifact's main program was already re-exported from it
    output = next(n for n in graph.nodes if n.op == "output")
    keys, values, valid = [], [], []
    for sdpa in _layer_attention(gm, domain.layers_path, domain.num_layers):
        names = [a.name for a in sdpa.target._schema.arguments]
        bound = {**dict(zip(names, sdpa.args)), **sdpa.kwargs}
        mask = bound.get("attn_mask")
        if mask is None:
            raise BuildError("decode: a layer's attention has no mask, so padded keys cannot be told apart")
        keys.append(_unrepeated(bound["key"]))
        values.append(_unrepeated(bound["value"]))
        with graph.inserting_before(output):
            row = graph.call_function(torch.ops.aten.select.int, (mask, 1, 0))
            row = graph.call_function(torch.ops.aten.select.int, (row, 1, -1))  # the last query's row
            if mask.meta["val"].dtype != torch.bool:  # additive mask: 0 where a key may be attended
                row = graph.call_function(torch.ops.aten.eq.Scalar, (row, 0))
        valid.append(row)
    (logits,) = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    output.args = (tuple([logits, *keys, *values, *valid]),)
    graph._codegen = fx.graph.CodeGen()  # flat tuple out, flat positional inputs
    gm.recompile()
    try:
        return reexport(gm, ctx.example_inputs, ctx.dynamic_shapes)
    except Exception as exc:
        first = first_line(exc)
        raise BuildError(f"decode: exporting the prefill program failed: {first}") from exc


class _StepCache:
    """What HF attention layers call `past_key_values`: hands back the layer's cache plus the new
    token's K/V, and keeps the new K/V for the step's outputs."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values
        self.new_keys: dict[int, torch.Tensor] = {}
        self.new_values: dict[int, torch.Tensor] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.new_keys[layer_idx], self.new_values[layer_idx] = key, value
        return torch.cat([self.keys[layer_idx], key], dim=2), torch.cat([self.values[layer_idx], value], dim=2)


class DecodeStep(torch.nn.Module):
    """One token per row through a Llama-style decoder with per-layer caches of different lengths.

    forward(input_ids [B, 1], positions [B, 1], keys, values, valid): lists with, per layer, keys and
    values [B, H_kv, L_i, hd] and valid [B, L_i] bool; returns (logits [B, V], *new_keys, *new_values).
    """

    def __init__(self, decoder: torch.nn.Module, lm_head: torch.nn.Module):
        super().__init__()
        self.decoder, self.lm_head = decoder, lm_head

    def forward(self, input_ids, positions, keys: list, values: list, valid: list):
        n = len(self.decoder.layers)
        hidden = self.decoder.embed_tokens(input_ids)
        rotary = self.decoder.rotary_emb(hidden, position_ids=positions)
        cache = _StepCache(keys, values)
        lowest = torch.finfo(hidden.dtype).min
        for i, layer in enumerate(self.decoder.layers):
            attend = torch.cat([valid[i], valid[i].new_ones((valid[i].shape[0], 1))], dim=1)
            mask = torch.where(attend, 0.0, lowest).to(hidden.dtype)[:, None, None, :]  # additive: sdpa and eager
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache)
        logits = self.lm_head(self.decoder.norm(hidden))[:, -1]
        return (logits, *[cache.new_keys[i] for i in range(n)], *[cache.new_values[i] for i in range(n)])


def export_decode(model: torch.nn.Module, plan: Plan) -> torch.export.ExportedProgram:
    """Export DecodeStep with a dynamic batch and one dynamic cache length per layer."""
    decoder, lm_head = plan.adapter.decoder(model)
    step = DecodeStep(decoder, lm_head).eval()
    lengths = cache_lengths(plan)
    batch = max(2, plan.lock["inputs"]["batch"])
    head_dim = decoder.layers[0].self_attn.head_dim
    _, d_kv = plan.adapter.attention_dims("llm")
    dtype = next(decoder.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(batch, d_kv // head_dim, n, head_dim, generator=gen).to(dtype) for n in lengths]
    values = [torch.randn(batch, d_kv // head_dim, n, head_dim, generator=gen).to(dtype) for n in lengths]
    valid = [torch.ones(batch, n, dtype=torch.bool) for n in lengths]
    inputs = (torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), max(lengths), dtype=torch.long),
              keys, values, valid)
    b = batch_dim()
    # DYNAMIC, not named Dims: the attention kernels guard on expressions in L that always hold but
    # that export's range check cannot prove
    cache_dims = [Dim.DYNAMIC] * len(lengths)
    dynamic = ({0: b}, {0: b}, [{0: b, 2: d} for d in cache_dims], [{0: b, 2: d} for d in cache_dims],
               [{0: b, 1: d} for d in cache_dims])
    try:
        with torch.no_grad():
            return torch.export.export(step, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        first = first_line(exc)
        raise BuildError(f"decode: exporting the decode step failed: {first}") from exc
