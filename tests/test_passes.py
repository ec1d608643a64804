"""Each pass on its own, on small graphs, against hand-written expectations.

The synthetic model below has what the next VLM families bring: 3-section position ids `[3, B, S]`
and a rotary table `[3, B, S, d]` whose batch axis is not the first, computed by a `rotary` module
and read by the layer after the cut. `propagate_tokens` must gather both along the token axis under
`keep_original` and compute the table again from renumbered positions under `renumber`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
from torch import fx
from torch.export import Dim

import prunec.ops  # noqa: F401
from prunec.context import CompileContext, StageRecord
from prunec.errors import BuildError
from prunec.graph_meta import CAPTURED, fake_value_mismatches, stamp_captured
from prunec.spec import Stage

D, HALF = 8, 4


class Rotary(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor([1.0, 0.5, 0.25, 0.125]))

    def forward(self, positions):  # [3, B, S] -> [3, B, S, 2 * HALF]
        freqs = positions[..., None].float() * self.inv_freq
        return torch.cat([freqs.sin(), freqs.cos()], dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D ** 0.5)

    def forward(self, hidden, table, positions):
        mixed = table.sum(dim=0) + positions.float().mean(dim=0)[..., None]  # [B, S, D]
        return hidden + torch.tanh(hidden @ self.weight) * mixed


class Synthetic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rotary = Rotary()
        self.layers = torch.nn.ModuleList([Layer(1), Layer(2)])

    def forward(self, hidden, positions, keep):
        table = self.rotary(positions)
        hidden = self.layers[0](hidden, table, positions)
        hidden = self.layers[1](hidden, table, positions)
        return hidden + keep.sum() * 0  # `keep` (the test's selection) is an input of the graph


def reference(model, hidden, positions, keep, policy):
    """Written from the definitions: layer 0 on every token; then each row keeps `keep`; under
    keep_original every kept token keeps its 3-D position, under renumber row b's positions become
    first_b + 0..K-1 in every section; layer 1 on the kept tokens."""
    table = model.rotary(positions)
    hidden = model.layers[0](hidden, table, positions)
    rows = []
    for b in range(hidden.shape[0]):
        h = hidden[b:b + 1, keep[b]]
        if policy == "keep_original":
            pos = positions[:, b:b + 1, keep[b]]
        else:
            pos = positions[:, b:b + 1, :1] + torch.arange(keep.shape[1])
        rows.append(model.layers[1](h, model.rotary(pos), pos))
    return torch.cat(rows, dim=0)


@dataclass
class _Domain:
    rotary_path: str


class _Adapter:
    def domains(self):
        return {"llm": _Domain("rotary")}


def _capture():
    model = Synthetic().eval()
    batch, seq = Dim("batch", min=2, max=64), Dim("seq", min=4, max=512)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 10, D, generator=gen), torch.randint(0, 30, (3, 2, 10), generator=gen),
              torch.zeros(2, 6, dtype=torch.long))
    program = torch.export.export(model, inputs, dynamic_shapes=({0: batch, 1: seq}, {1: batch, 2: seq},
                                                                 {0: batch, 1: Dim("kept", min=1, max=512)}),
                                     strict=False)
    return model, program.module()


def _cut_after_layer0(gm, policy):
    """What locate_sites + insert_prune_ops leave for one stage: the layer-0 output gathered by
    the `keep` input, its length as a SymInt."""
    graph = gm.graph
    stamp_captured(gm)
    layer0 = [n for n in graph.nodes if "layers.0" in str(n.meta.get("nn_module_stack", {}))]
    site = layer0[-1]
    keep = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "keep")
    with graph.inserting_after(site):
        gathered = graph.call_function(torch.ops.prunec.gather_tokens.default, (site, keep, [1]))
    with graph.inserting_after(gathered):
        kept_len = graph.call_function(torch.ops.aten.sym_size.int, (gathered, 1))
    token_size = site.meta[CAPTURED].shape[1]
    kept_len.meta[CAPTURED] = token_size
    stage = Stage("/pipeline/0", "llm.layers[0]", "llm", 0, "test", "prune", (), policy, (), ("count", 6))
    record = StageRecord(stage, anchor=site, site_value=site, token_size=token_size, index=keep,
                         gathered=gathered, kept_len=kept_len, block_end=kept_len)
    ctx = CompileContext(plan=None, adapter=_Adapter(), example_inputs=(), dynamic_shapes=())
    ctx.records.append(record)
    return ctx, record


@pytest.mark.parametrize("policy", ["keep_original", "renumber"])
def test_propagate_tokens_mrope_layout(policy):
    from prunec.passes import propagate_tokens

    model, gm = _capture()
    ctx, record = _cut_after_layer0(gm, policy)
    propagate_tokens(gm, ctx)
    gen = torch.Generator().manual_seed(5)
    for batch, seq, kept in [(2, 10, 6), (3, 13, 5)]:
        hidden = torch.randn(batch, seq, D, generator=gen)
        positions = torch.randint(0, 40, (3, batch, seq), generator=gen)  # not 0..S-1: "first K" would be wrong
        keep = torch.stack([torch.randperm(seq, generator=gen)[:kept].sort().values for _ in range(batch)])
        with torch.no_grad():
            torch.testing.assert_close(gm(hidden, positions, keep),
                                       reference(model, hidden, positions, keep, policy), atol=1e-6, rtol=0)
    how = "\n".join(record.propagated)
    if policy == "keep_original":
        assert "positions: gathered on dims [2] (batch axis 1)" in how  # [3, B, S]
        assert "gathered on dims [2] (batch axis 1)" in how.replace("positions: gathered", "")  # [3, B, S, d]
    else:
        assert "positions: renumbered position ids" in how and "recomputed from renumbered positions" in how
    assert not fake_value_mismatches(gm)
    assert ctx.pass_reports["propagate_tokens"]["values_rewritten"] == len(record.propagated)


def test_a_token_axis_without_batch_axis_stops_the_build():
    from prunec.passes.propagate_tokens import token_axes

    _, gm = _capture()
    stamp_captured(gm)
    hidden = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "hidden")
    positions = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "positions")
    batch, seq = hidden.meta["val"].shape[0], hidden.meta["val"].shape[1]
    assert token_axes(positions.meta["val"], seq, batch, "positions", "site") == ([2], 1)
    assert token_axes(hidden.meta["val"], seq, batch, "hidden", "site") == ([1], 0)
    with hidden.meta["val"].fake_mode:
        no_batch = torch.empty(3, seq)
    with pytest.raises(BuildError, match="no batch axis"):
        token_axes(no_batch, seq, batch, "table", "site")
    assert token_axes(torch.empty(7, 3), seq, batch, "other", "site") == ([], None)
    with hidden.meta["val"].fake_mode:
        sequence_first = torch.empty(seq, batch, 4)
    assert token_axes(sequence_first, seq, batch, "sequence-first", "site") == ([0], 1)


# --------------------------------------------------------------------------- the passes on a tiny Llama

TWO_STAGES = """
    prunec: 1
    name: passes
    model: {builtin: tiny-llama}
    inputs: {batch: 2, seq_len: 14}
    pipeline:
      - site: llm.layers[0]
        method: fastv
        keep: {count: 9}
      - site: llm.layers[1]
        method: fastv
        keep: {count: 5}
"""


def _pipeline_until(tmp_path, last: str):
    """(plan, ctx, gm) after the compiler's passes up to and including `last`."""
    from conftest import write_spec

    import prunec
    from prunec.capture import capture
    from prunec.compiler import example_shape
    from prunec.models import load_model
    from prunec.passes import PIPELINE
    from prunec.schedule import min_tokens

    plan = prunec.plan(write_spec(tmp_path, TWO_STAGES))
    model = load_model(plan.lock["model"], plan.spec.base_dir)
    captured = capture(model, plan.adapter, example_shape(plan), 0, min_tokens=min_tokens(plan))
    ctx = CompileContext(plan, plan.adapter, captured.example_inputs, captured.dynamic_shapes)
    gm = captured.graph_module
    for graph_pass in PIPELINE:
        gm = graph_pass(gm, ctx)
        if graph_pass.__name__ == last:
            return plan, ctx, gm, model
    raise AssertionError(last)


def _llama_batch(seq=14):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 200, (3, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def test_locate_sites_finds_each_layer_output(tmp_path):
    from prunec.adapters.base import module_path

    plan, ctx, gm, _ = _pipeline_until(tmp_path, "locate_sites")
    assert [r.stage.layer for r in ctx.records] == [0, 1]
    for record in ctx.records:
        layer = f"layers.{record.stage.layer}"
        assert layer in module_path(record.anchor) and layer in module_path(record.site_value)
        assert record.attention.target is torch.ops.aten.scaled_dot_product_attention.default
        assert layer in module_path(record.attention)
        assert tuple(record.site_value.meta["val"].shape[:2]) == tuple(
            next(n for n in gm.graph.nodes if n.target == "input_ids").meta["val"].shape)
        # the anchor is the layer's last node: the next node belongs to the next module
        assert layer not in module_path(record.anchor.next)
    assert ctx.pass_reports["locate_sites"] == {"sites": 2}


def test_insert_prune_ops_adds_unread_blocks_with_true_shapes(tmp_path):
    from prunec.graph_meta import ROLE

    plan, ctx, gm, _ = _pipeline_until(tmp_path, "insert_prune_ops")
    inserted = [n for n in gm.graph.nodes if ROLE in n.meta]
    assert ctx.pass_reports["insert_prune_ops"] == {"stages": 2, "nodes_inserted": len(inserted)}
    for record, kept in zip(ctx.records, (9, 5)):
        assert record.index.target is torch.ops.prunec.select_topk.default
        assert set(record.gathered.users) == {record.kept_len}  # nothing downstream reads it yet
        seq = record.site_value.meta["val"].shape[1]
        assert record.gathered.meta["val"].shape[1] == seq - record.stage.n_candidates + kept  # true shape
        assert record.gathered.meta[CAPTURED].shape[1] == seq  # captured: token axis by symbol
    assert not fake_value_mismatches(gm)


def test_propagate_tokens_rewires_the_tail(tmp_path):
    plan, ctx, gm, model = _pipeline_until(tmp_path, "propagate_tokens")
    first, second = ctx.records
    assert "residual stream" in " ".join(first.propagated)
    assert any("gathered on dims [2, 3]" in p for p in first.propagated)  # the 4-D mask
    assert not fake_value_mismatches(gm)
    ids, mask = _llama_batch()
    out = gm(ids, mask)
    assert out.shape[1] == 14 - (13 - 9) - (9 - 5)


def test_eliminate_dead_code_removes_full_length_leftovers(tmp_path):
    plan, ctx, gm, _ = _pipeline_until(tmp_path, "eliminate_dead_code")
    assert ctx.pass_reports["eliminate_dead_code"]["nodes_removed"] > 0
    unused = [n.name for n in gm.graph.nodes if not n.users and n.op != "output" and not n.is_impure()]
    assert not unused


def test_fuse_gathers_merges_a_stages_gathers_and_keeps_values(tmp_path):
    import copy

    from prunec.passes import fuse_gathers

    plan, ctx, gm, _ = _pipeline_until(tmp_path, "eliminate_dead_code")
    unfused = copy.deepcopy(gm)
    gathers = [n for n in gm.graph.nodes if n.target is torch.ops.prunec.gather_tokens.default]
    fuse_gathers(gm, ctx)
    many = [n for n in gm.graph.nodes if n.target is torch.ops.prunec.gather_tokens_many.default]
    left = [n for n in gm.graph.nodes if n.target is torch.ops.prunec.gather_tokens.default]
    assert len(many) == 2  # one per stage
    report = ctx.pass_reports["fuse_gathers"]
    assert report["fused_gathers"] == 2 and report["gathers_fused"] == len(gathers) - len(left) >= 4
    ids, mask = _llama_batch()
    torch.testing.assert_close(gm(ids, mask), unfused(ids, mask), atol=0, rtol=0)
    assert not fake_value_mismatches(gm)


def test_verify_refuses_a_lost_selection(tmp_path):
    from prunec.graph_meta import ROLE
    from prunec.passes import verify

    plan, ctx, gm, _ = _pipeline_until(tmp_path, "fuse_gathers")
    record = ctx.records[0]
    with gm.graph.inserting_after(record.index):
        orphan = gm.graph.call_function(torch.ops.prunec.select_topk.default, tuple(record.index.args))
    orphan.meta[ROLE] = "select"
    with pytest.raises(BuildError, match="used by nothing"):
        verify(gm, ctx)
    gm.graph.erase_node(orphan)
    verify(gm, ctx)
    assert ctx.pass_reports["verify"]["nodes"] > 0
