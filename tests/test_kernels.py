"""Triton kernels against their torch implementations, under Triton's CPU interpreter, and compiled
ahead of time for Hopper (sm_90) with no GPU present.

Tolerances: both sides compute in fp32 from the same (fp32, fp16 or bf16) inputs, so they differ
only by summation order: 2e-6 absolute on probabilities and transitions for every dtype (checked
also relative to the largest value); gathers are bit-exact; selected indices identical. ToMe's
matching runs on the fp32 metric (1e-6 on similarities, partners identical); its merge rounds once
to the output dtype (relative to the largest value: 2e-6 fp32, 1e-3 fp16, 8e-3 bf16).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must enable the interpreter before triton loads"

from prunec.kernels.attention_rows import attention_rows, attention_rows_torch  # noqa: E402
from prunec.kernels.gather import gather_rows, gather_rows_torch  # noqa: E402
from prunec.kernels.token_transition import token_transition  # noqa: E402
from prunec.methods.transprune import token_transition as token_transition_torch  # noqa: E402
from prunec.kernels.max_min_greedy import max_min_greedy  # noqa: E402
from prunec.kernels.topk_spans import topk_spans  # noqa: E402
from prunec.methods.divprune import divprune_keep  # noqa: E402
from prunec.ops import select_topk  # noqa: E402
from prunec.kernels.bipartite_merge import bipartite_match, merge_into  # noqa: E402
from prunec.methods import tome as tome_method  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = 2e-6


def _sorted_keep(batch, seq, kept, gen):
    return torch.stack([torch.randperm(seq, generator=gen)[:kept].sort().values for _ in range(batch)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, kept", [((1, 7, 5), 3), ((3, 37, 33), 20), ((2, 130, 300), 67), ((2, 19, 3, 17), 9)])
def test_gather_rows_is_exact(dtype, shape, kept):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    index = _sorted_keep(shape[0], shape[1], kept, gen)
    assert torch.equal(gather_rows(x, index), gather_rows_torch(x, index))


@pytest.mark.parametrize("batch, seq, kept", [(1, 7, 3), (3, 37, 20), (2, 300, 67)])
def test_gather_many_is_exact_for_mixed_tensors(batch, seq, kept):
    """One call over a stage's tensors: every dtype, bool masks, odd widths (narrower words), a
    batch-1 rotary table, a non-contiguous view."""
    from prunec.kernels.gather_many import gather_many

    gen = torch.Generator().manual_seed(seq)
    index = _sorted_keep(batch, seq, kept, gen)
    tensors = [torch.randn(batch, seq, 33, generator=gen).to(torch.bfloat16),
               torch.randn(batch, seq, 64, generator=gen),
               torch.randint(0, 1000, (batch, seq), generator=gen),
               torch.rand(batch, seq, generator=gen) > 0.5,
               torch.randn(1, seq, 16, generator=gen),
               torch.randn(batch, seq, 3, 5, generator=gen).half(),
               torch.randn(batch, 24, seq, generator=gen).transpose(1, 2)]
    for x, out in zip(tensors, gather_many(tensors, index)):
        assert out.dtype == x.dtype and torch.equal(out, gather_rows_torch(x, index))


def test_gather_rows_broadcasts_a_batch_one_table():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1, 29, 16, generator=gen)  # rotary cos/sin are [1, S, hd]
    index = _sorted_keep(3, 29, 11, gen)
    assert torch.equal(gather_rows(table, index), gather_rows_torch(table, index))


def _mask(kind, batch, seq, gen):
    """Left padding of up to a third of the row (long-padding: row 0 has 150 pads, so whole key
    blocks are masked, and row 1's first query rows attend to nothing)."""
    if kind is None:
        return None
    pads = torch.randint(0, seq // 3, (batch,), generator=gen)
    if kind == "long-padding":
        pads = torch.tensor([150, seq - 2])
        kind = "bool"
    real = torch.arange(seq)[None, :] >= pads[:, None]          # left padding
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None, None] & real[:, None, None, :]
    if kind == "bool":
        return allowed
    if kind == "additive":
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    return real[:, None, None, :]                                  # [B, 1, 1, S] padding-only mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, heads, kv_heads, rows, seq, head_dim, mask, causal", [
    (1, 4, 4, 1, 37, 16, None, True),
    (3, 8, 2, 1, 130, 32, "bool", False),
    (2, 4, 2, 5, 61, 16, "additive", False),
    (2, 2, 1, 64, 100, 64, "padding", True),
    (2, 4, 4, 3, 200, 16, "long-padding", False),
])
def test_attention_rows_match_torch(dtype, batch, heads, kv_heads, rows, seq, head_dim, mask, causal):
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    q = torch.randn(batch, heads, rows, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype)
    m = _mask(mask, batch, seq, gen)
    scale = head_dim ** -0.5
    expected = attention_rows_torch(q, k, m, scale, causal)
    actual = attention_rows(q, k, m, scale, causal)
    valid = ~torch.isnan(expected)
    assert torch.equal(valid, ~torch.isnan(actual))  # the same fully masked rows
    torch.testing.assert_close(actual[valid], expected[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 8), (2, 37, 96), (3, 300, 130)])
@pytest.mark.parametrize("abs_cos", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_token_transition_matches_torch(dtype, shape, abs_cos, padded):
    gen = torch.Generator().manual_seed(shape[1])
    x_in = torch.randn(shape, generator=gen).to(dtype)
    x_out = (0.5 * x_in.float() + torch.randn(shape, generator=gen)).to(dtype)
    valid = None
    if padded:  # left padding of a different length per row
        pads = torch.arange(shape[0]) * (shape[1] // 3)
        valid = torch.arange(shape[1])[None, :] >= pads[:, None]
    expected = token_transition_torch(x_in, x_out, valid, "abs" if abs_cos else "signed")
    actual = token_transition(x_in, x_out, valid, abs_cos)
    torch.testing.assert_close(actual, expected, atol=ATOL * expected.abs().max().item() + ATOL, rtol=0)
    # from the formula: dividing out the magnitude ratio leaves a softmax over each row's valid tokens
    valid = torch.ones(shape[:2], dtype=torch.bool) if valid is None else valid
    ratio = x_out.float().norm(dim=-1) / x_in.float().norm(dim=-1)
    assert torch.equal(actual[~valid], torch.zeros_like(actual[~valid]))
    torch.testing.assert_close(torch.where(valid, actual / ratio, 0.0).sum(-1), torch.ones(shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq, n_keep, ties", [(1, 7, 2, False), (3, 37, 9, True), (2, 300, 100, True),
                                                      (4, 1000, 1, False)])
def test_topk_spans_selects_the_same_indices(dtype, batch, seq, n_keep, ties):
    """Ragged spans (each row's candidates at its own offset), ties broken by the lower index."""
    gen = torch.Generator().manual_seed(seq)
    scores = torch.randn(batch, seq, generator=gen)
    if ties:  # few distinct values: many exact ties around the k-th score
        scores = (scores * 2).round() / 2
    scores = scores.to(dtype)
    n_candidates = seq // 2
    candidates = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(0, seq - n_candidates + 1, (1,), generator=gen))
        candidates[b, start:start + n_candidates] = True
    expected = select_topk(scores, candidates, n_candidates, n_keep)  # CPU tensors: the torch path
    assert torch.equal(topk_spans(scores.float(), candidates, n_candidates, n_keep), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, n_tokens, dim, n_keep", [(1, 5, 8, 5), (3, 37, 24, 9), (2, 130, 64, 33)])
def test_max_min_greedy_picks_the_same_tokens(dtype, batch, n_tokens, dim, n_keep):
    """The fused greedy loop against DivPrune's torch loop, and against the slow reference."""
    from reference import slow_divprune

    gen = torch.Generator().manual_seed(n_tokens)
    features = torch.randn(batch, n_tokens, dim, generator=gen).to(dtype)
    expected = divprune_keep(features, n_keep)
    actual = divprune_keep(features, n_keep, greedy=max_min_greedy)
    assert torch.equal(actual, expected)
    assert actual[0].tolist() == slow_divprune(features[0].float(), n_keep)


def test_max_min_greedy_breaks_ties_to_the_lower_index():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(divprune_keep(features, 4, greedy=max_min_greedy), divprune_keep(features, 4))


@pytest.mark.parametrize("batch, n_a, n_b, dim", [(1, 5, 4, 8), (3, 37, 33, 24), (2, 100, 97, 64), (2, 70, 130, 40)])
def test_bipartite_match_finds_the_same_partners(batch, n_a, n_b, dim):
    """Non-power-of-two token counts and widths; similarities within 1e-6, partners identical."""
    gen = torch.Generator().manual_seed(n_a)
    a = torch.nn.functional.normalize(torch.randn(batch, n_a, dim, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(batch, n_b, dim, generator=gen), dim=-1)
    best, partner = bipartite_match(a, b)
    expected_best, expected_partner = tome_method._match(a, b)
    torch.testing.assert_close(best, expected_best, atol=1e-6, rtol=0)
    assert torch.equal(partner, expected_partner)
    slow = torch.tensor([[max(range(n_b), key=lambda j: (float(a[r, i] @ b[r, j]), -j)) for i in range(n_a)]
                         for r in range(batch)])
    assert torch.equal(partner, slow)


def test_bipartite_match_breaks_ties_to_the_lower_index_across_tiles():
    a = torch.tensor([[[1.0, 0.0]] * 3])
    b = torch.zeros(1, 70, 2)
    b[0, [5, 40, 69]] = torch.tensor([1.0, 0.0])  # the same best partner in three B tiles of 32
    assert bipartite_match(a, b)[1].tolist() == [[5, 5, 5]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, seq, width, r", [(1, 9, 8, 3), (3, 57, 96, 20), (2, 200, 130, 90)])
def test_merge_into_equals_scatter_add(dtype, batch, seq, width, r):
    """Several sources per destination (atomics), sizes from earlier merges, all three dtypes."""
    gen = torch.Generator().manual_seed(seq)
    hidden = torch.randn(batch, seq, width, generator=gen).to(dtype)
    size = torch.randint(1, 5, (batch, seq), generator=gen).float()
    perm = torch.stack([torch.randperm(seq, generator=gen) for _ in range(batch)])
    src = perm[:, :r]
    dst = perm[:, r:][:, torch.randint(0, max(1, r // 3), (r,), generator=gen)]  # shared destinations
    merged, new_size = merge_into(hidden, size, src, dst)
    expected, expected_size = tome_method._merge(hidden, size, src, dst)
    assert merged.dtype == dtype and torch.equal(new_size, expected_size)
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # one rounding of the output
    torch.testing.assert_close(merged.float(), expected.float(), atol=tol * expected.float().abs().max().item(), rtol=0)


def test_tome_through_the_kernels_equals_the_torch_path():
    gen = torch.Generator().manual_seed(3)
    hidden, keys = torch.randn(2, 50, 48, generator=gen), torch.randn(2, 3, 50, 16, generator=gen)
    size = torch.randint(1, 3, (2, 50), generator=gen).float()
    candidates = torch.ones(2, 50, dtype=torch.bool)
    candidates[:, 0] = False  # [CLS]
    expected = tome_method.tome_merge(hidden, size, keys, candidates, 30)
    actual = tome_method.tome_merge(hidden, size, keys, candidates, 30, match=bipartite_match, merge=merge_into)
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], atol=2e-6, rtol=0)
    assert torch.equal(actual[2], expected[2])


def test_ops_dispatch_to_the_kernels_and_keep_results(build, monkeypatch):
    """An emitted module whose prunec ops take the Triton path (forced on CPU, interpreted) gives
    the torch path's output: the dispatch wiring is exercised without a GPU."""
    from conftest import llava_inputs

    import prunec.ops

    plan, module, _ = build("""
        prunec: 1
        name: kernels-dispatch
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 30}
        pipeline:
          - {site: projector.output, method: divprune, keep: {count: 14}}
          - {site: "llm.layers[0]", method: fastv, params: {query: all}, keep: {count: 10}, positions: renumber}
          - {site: "llm.layers[2]", method: fastv, keep: {count: 4}}
    """)
    ids, mask, pixels = llava_inputs(plan.adapter.config, [0, 2, 5], seq_len=30, seed=4)
    with torch.no_grad():
        expected = module(ids, mask, pixels)
    calls = []
    monkeypatch.setattr(prunec.ops, "use_triton", lambda *t: calls.append(1) or True)
    with torch.no_grad():
        actual = module(ids, mask, pixels)
    assert calls, "the Triton path was not taken"
    for b, pad in enumerate([0, 2, 5]):
        torch.testing.assert_close(actual[b, pad:], expected[b, pad:], atol=1e-5, rtol=0)


def test_every_kernel_compiles_for_hopper():
    """AOT compile to PTX and cubin for sm_90 in a process without the interpreter."""
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from prunec.kernels import (attention_rows, bipartite_merge, gather, gather_many, max_min_greedy, token_transition,
                                    topk_spans)

        target = GPUTarget("cuda", 90, 32)
        def build(fn, signature, constexprs):
            for name in constexprs:
                signature[name] = "constexpr"
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
            assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"], fn.__name__
            print("compiled", fn.__name__)
        for dtype in ("fp32", "fp16", "bf16"):
            build(gather.gather_rows_kernel,
                  {"x_ptr": f"*{dtype}", "index_ptr": "*i64", "out_ptr": f"*{dtype}", "kept": "i32", "features": "i32",
                   "stride_xb": "i32", "stride_xs": "i32", "stride_ib": "i32", "stride_ob": "i32", "stride_ok": "i32"},
                  {"BLOCK_K": 32, "BLOCK_F": 128})
            strides = {f"stride_{n}": "i32" for n in ("qb", "qh", "qr", "kb", "kh", "kn", "mb", "mr", "mn", "sr", "sh")}
            flags = {"HAS_MASK": True, "MASK_IS_BOOL": True, "CAUSAL": False, "HEAD_DIM": 128, "BLOCK_N": 64}
            build(attention_rows.attention_rows_partial_kernel,
                  {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "mask_ptr": "*i8", "stats_ptr": "*fp32", "rows": "i32",
                   "group": "i32", "n_keys": "i32", "first_row": "i32", "scale": "fp32", **strides}, dict(flags))
            build(attention_rows.attention_rows_probs_kernel,
                  {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "mask_ptr": "*i8", "stats_ptr": "*fp32", "out_ptr": "*fp32",
                   "heads": "i32", "rows": "i32", "group": "i32", "n_keys": "i32", "n_blocks": "i32", "first_row": "i32",
                   "scale": "fp32", **strides, "stride_or": "i32"}, {**flags, "BLOCK_B": 64})
            build(bipartite_merge.merge_add_kernel,
                  {"hidden_ptr": f"*{dtype}", "size_ptr": "*fp32", "src_ptr": "*i64", "dst_ptr": "*i64", "acc_ptr": "*fp32",
                   "size_acc_ptr": "*fp32", "n_src": "i32", "width": "i32", "stride_hb": "i32", "stride_hs": "i32",
                   "stride_sb": "i32", "stride_ib": "i32", "stride_ab": "i32", "stride_as": "i32"},
                  {"BLOCK_R": 16, "BLOCK_F": 128})
            build(token_transition.transition_stats_kernel,
                  {"x_in_ptr": f"*{dtype}", "x_out_ptr": f"*{dtype}", "valid_ptr": "*i8", "ratio_ptr": "*fp32",
                   "turn_ptr": "*fp32", "n_tokens": "i32", "features": "i32", "eps": "fp32", "stride_ib": "i32",
                   "stride_is": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_vb": "i32", "stride_rb": "i32"},
                  {"ABS_COS": False, "HAS_VALID": True, "BLOCK_S": 16, "BLOCK_D": 128})
        for word in (8, 4, 2, 1):
            build(gather_many.gather_many_kernel, {"table_ptr": "*i64", "index_ptr": "*i64", "kept": "i32", "stride_ib": "i32"},
                  {"WORD": word, "BLOCK_K": 16, "BLOCK_W": 128})
        build(topk_spans.topk_spans_kernel,
              {"scores_ptr": "*fp32", "candidates_ptr": "*i8", "out_ptr": "*i64", "n_tokens": "i32", "n_keep": "i32",
               "stride_sb": "i32", "stride_cb": "i32", "stride_ob": "i32"}, {"BLOCK_S": 1024})
        build(max_min_greedy.max_min_greedy_kernel,
              {"distance_ptr": "*fp32", "first_ptr": "*i64", "out_ptr": "*i64", "n_tokens": "i32", "n_keep": "i32",
               "stride_db": "i32", "stride_dr": "i32", "stride_ob": "i32"}, {"BLOCK_N": 1024})
        build(bipartite_merge.bipartite_match_kernel,
              {"a_ptr": "*fp32", "b_ptr": "*fp32", "best_ptr": "*fp32", "partner_ptr": "*i64", "n_a": "i32", "n_b": "i32",
               "dim": "i32", "stride_ab": "i32", "stride_an": "i32", "stride_bb": "i32", "stride_bn": "i32",
               "stride_ob": "i32"}, {"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_D": 32})
        build(token_transition.weighted_softmax_kernel,
              {"turn_ptr": "*fp32", "ratio_ptr": "*fp32", "out_ptr": "*fp32", "n_tokens": "i32", "stride_b": "i32"},
              {"BLOCK_S": 256})
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 23


def test_backend_option_picks_the_path_and_keeps_results(build, monkeypatch):
    """backend: torch never launches a kernel; triton takes them (interpreted on CPU); auto on CPU
    takes none; all three give the same output."""
    from conftest import llava_inputs

    import prunec.kernels.gather as gather_module

    launches = []
    real = gather_module.gather_rows
    monkeypatch.setattr(gather_module, "gather_rows", lambda *a, **k: launches.append(1) or real(*a, **k))
    outputs = {}
    for mode in ("torch", "triton", "auto"):
        plan, module, _ = build(f"""
            prunec: 1
            name: backend-{mode}
            model: {{builtin: tiny-llava}}
            inputs: {{batch: 2, seq_len: 30}}
            backend: {mode}
            pipeline:
              - {{site: projector.output, method: divprune, keep: {{count: 12}}}}
              - {{site: "llm.layers[1]", method: fastv, keep: {{count: 6}}}}
        """)
        ids, mask, pixels = llava_inputs(plan.adapter.config, [0, 3], seq_len=30, seed=2)
        launches.clear()
        with torch.no_grad():
            outputs[mode] = module(ids, mask, pixels)
        assert bool(launches) == (mode == "triton"), mode
    for mode in ("triton", "auto"):
        for b, pad in enumerate([0, 3]):
            torch.testing.assert_close(outputs[mode][b, pad:], outputs["torch"][b, pad:], atol=1e-5, rtol=0)


def test_select_topk_breaks_exact_ties_to_the_lower_index():
    """Torch path, by hand: 0.9 first, then the exact ties at 0.5 go to the lowest indices."""
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.5, 0.1, 7.0],
                           [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    candidates = torch.tensor([[True] * 6 + [False], [False] + [True] * 6])
    kept = select_topk(scores, candidates, 6, 3)
    assert kept.tolist() == [[0, 1, 2, 6], [0, 1, 2, 3]]


_DEVICE_TIES = """
import torch
from prunec.kernels.topk_spans import topk_spans
from prunec.kernels.max_min_greedy import max_min_greedy
from prunec.methods.divprune import divprune_keep
scores = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.5, 0.1, 7.0], [0.2] * 7], device="cuda")
candidates = torch.tensor([[True] * 6 + [False], [False] + [True] * 6], device="cuda")
assert topk_spans(scores, candidates, 6, 3).tolist() == [[0, 1, 2, 6], [0, 1, 2, 3]]
features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]]], device="cuda")
assert divprune_keep(features, 4, greedy=max_min_greedy).tolist() == divprune_keep(features.cpu(), 4).tolist()
print("ties ok")
"""


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the compiled Triton kernels")
def test_compiled_kernels_break_exact_ties_to_the_lower_index():
    """The interpreter's argmax ignores the tie flag, so this is only shown by compiled kernels."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _DEVICE_TIES], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ties ok" in result.stdout, result.stderr
