"""Triton kernels against their torch implementations: time and effective bandwidth.

    python benchmarks/kernels.py                 # on a CUDA machine: the real measurement
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # CPU: checks the script runs (times meaningless)

The stage gather moves a stage's hidden states, position ids, candidate mask and rotary cos/sin
in one `gather_many` call against five torch gathers.

Each pair runs alternately (A B A B ...) after a warm-up; medians of CUDA-event (or wall-clock)
times. Effective bandwidth = bytes the kernel must read and write / time. Sizes follow the issue:
a residual-stream gather of 576 -> 144 visual tokens x 4096, attention rows for 1-64 queries
against 4096 keys (32 heads, head_dim 128), DivPrune 576 -> 144 (its greedy loop fused vs torch's
loop; both include the distance matmul), token transitions over 4096 tokens x 4096, ToMe's bipartite
matching of 576 tokens (288 x 288, head_dim 64 metric) and its size-weighted merge of r = 144 rows
x 1024 (ViT-L width).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunec.kernels.attention_rows import attention_rows, attention_rows_torch
from prunec.kernels.gather import gather_rows, gather_rows_torch
from prunec.kernels.gather_many import gather_many
from prunec.kernels.max_min_greedy import max_min_greedy
from prunec.kernels.token_transition import token_transition
from prunec.methods.transprune import token_transition as token_transition_torch
from prunec.methods.divprune import divprune_keep, greedy_max_min
from prunec.kernels.bipartite_merge import bipartite_match, merge_into
from prunec.methods import tome as tome_method


def _time(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def compare(name: str, triton_fn, torch_fn, moved_bytes: int, rounds: int, device: str) -> str:
    for fn in (triton_fn, torch_fn):
        fn()
    samples = {"triton": [], "torch": []}
    for _ in range(rounds):
        samples["triton"].append(_time(triton_fn, device))
        samples["torch"].append(_time(torch_fn, device))
    t, r = statistics.median(samples["triton"]), statistics.median(samples["torch"])
    return (f"| {name} | {t * 1e6:.1f} | {r * 1e6:.1f} | {r / t:.2f}x | {moved_bytes / t / 1e9:.0f} | "
            f"{moved_bytes / r / 1e9:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    hidden, tokens, kept = (64, 40, 10) if args.smoke else (4096, 576, 144)
    heads, head_dim, keys = (4, 16, 50) if args.smoke else (32, 128, 4096)
    rounds = 3 if args.smoke else args.rounds
    element = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    lines = [f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, {args.dtype}, "
             f"torch {torch.__version__}, medians of {rounds}",
             "| kernel | triton us | torch us | speedup | triton GB/s | torch GB/s |", "|---|---|---|---|---|---|"]

    x = torch.randn(1, tokens, hidden, generator=gen).to(device, dtype)
    index = torch.randperm(tokens, generator=gen)[:kept].sort().values[None].to(device)
    lines.append(compare(f"gather {tokens}->{kept} x {hidden}", lambda: gather_rows(x, index),
                         lambda: gather_rows_torch(x, index), 2 * kept * hidden * element, rounds, device))
    stage = [x, torch.randint(0, tokens, (1, tokens), generator=gen).to(device),
             (torch.rand(1, tokens, generator=gen) > 0.5).to(device),
             torch.randn(1, tokens, head_dim, generator=gen).to(device), torch.randn(1, tokens, head_dim, generator=gen).to(device)]
    stage_bytes = 2 * kept * sum(t[0, 0].numel() * t.element_size() for t in stage)
    lines.append(compare(f"stage gather (hidden, positions, mask, cos, sin) {tokens}->{kept}",
                         lambda: gather_many(stage, index), lambda: [gather_rows_torch(t, index) for t in stage],
                         stage_bytes, rounds, device))
    for rows in (1, 8, 64):
        q = torch.randn(1, heads, rows, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(1, heads, keys, head_dim, generator=gen).to(device, dtype)
        lines.append(compare(f"attention rows {rows} x {keys} keys", lambda: attention_rows(q, k, None, head_dim ** -0.5, False),
                             lambda: attention_rows_torch(q, k, None, head_dim ** -0.5, False),
                             k.numel() * element + rows * keys * 4, rounds, device))
    features = torch.randn(1, tokens, hidden, generator=gen).to(device, dtype)
    lines.append(compare(f"divprune {tokens} -> {kept} (greedy loop)",
                         lambda: divprune_keep(features, kept, greedy=max_min_greedy),
                         lambda: divprune_keep(features, kept, greedy=greedy_max_min),
                         tokens * tokens * 4, rounds, device))
    a = torch.randn(1, keys, hidden, generator=gen).to(device, dtype)
    b = torch.randn(1, keys, hidden, generator=gen).to(device, dtype)
    lines.append(compare(f"token transition {keys} x {hidden}", lambda: token_transition(a, b),
                         lambda: token_transition_torch(a, b), 2 * a.numel() * element, rounds, device))
    n_half, metric_dim, width, r = (20, 16, 64, 8) if args.smoke else (tokens // 2, 64, 1024, 144)
    ma = torch.nn.functional.normalize(torch.randn(1, n_half, metric_dim, generator=gen), dim=-1).to(device)
    mb = torch.nn.functional.normalize(torch.randn(1, n_half, metric_dim, generator=gen), dim=-1).to(device)
    lines.append(compare(f"tome match {n_half} x {n_half} (d {metric_dim})", lambda: bipartite_match(ma, mb),
                         lambda: tome_method._match(ma, mb), 2 * n_half * metric_dim * 4 + n_half * 12, rounds, device))
    hidden_m = torch.randn(1, 2 * n_half, width, generator=gen).to(device, dtype)
    size = torch.ones(1, 2 * n_half, device=device)
    perm = torch.randperm(2 * n_half, generator=gen).to(device)
    src, dst = perm[:r][None], perm[r:2 * r][None]
    lines.append(compare(f"tome merge {r} rows x {width}", lambda: merge_into(hidden_m, size, src, dst),
                         lambda: tome_method._merge(hidden_m, size, src, dst),
                         2 * hidden_m.numel() * element + 3 * r * width * 4, rounds, device))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
