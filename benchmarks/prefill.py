"""Regenerate the prefill table of docs/benchmarks.md: `prunec bench` over the specs in
benchmarks/specs/ (the LLaVA-shaped workload described in base.yaml).

    OMP_NUM_THREADS=1 python benchmarks/prefill.py [--rounds N] [--json out.json] [--specs a.yaml b.yaml]
    python benchmarks/prefill.py --from-json docs/benchmarks-prefill.json   # re-print a recorded run

Each spec is built (timed), then the unpruned model, the emitted module and the eager-attention way
run alternately (A B C A B C ...) after a warm-up; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from prunec.bench import bench_spec

SPECS = Path(__file__).parent / "specs"
RUNS = ["fastv-k2-keep25.yaml", "pyramiddrop.yaml", "divprune-keep25.yaml", "divprune-keep11.yaml"]
METHOD_RUNS = ["transprune-high.yaml", "sparsevlm-192.yaml", "visionzip-64.yaml", "holov-64.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write every report here")
    parser.add_argument("--from-json", type=Path, help="print the tables of a recorded run instead of running")
    parser.add_argument("--specs", nargs="+", default=RUNS,
                        help=f"spec files in benchmarks/specs (default: {' '.join(RUNS)}; the method-library "
                             f"table: {' '.join(METHOD_RUNS)})")
    args = parser.parse_args()
    if args.from_json:
        reports = json.loads(args.from_json.read_text())
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        reports = []
        for name in args.specs:
            reports.append(bench_spec(SPECS / name, rounds=args.rounds))
            print(f"done: {name}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(reports, indent=2) + "\n")
    print_tables(reports)


def print_tables(reports: list[dict]) -> None:
    first = reports[0]
    print(f"\n{first['machine']}, {first['threads']} thread(s), "
          + ", ".join(f"{k} {v}" for k, v in first["versions"].items() if k in ("torch", "transformers"))
          + f", {first['rounds']} rounds, medians\n")
    print("| spec | unpruned ms | prunec ms | eager way ms | speedup | ideal (exact FLOPs) | efficiency | "
          "prunec ops share | rescoring FLOPs share | over eager way | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        median = r["median_ms"]
        print(f"| {r['spec']} | {median['unpruned']:.0f} | {median['prunec']:.0f} | "
              f"{median.get('eager way', float('nan')):.0f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
              f"{r['efficiency']:.2f} | {r['prunec_ops_share']:.2%} | {r['scoring_flops_share']:.2%} | "
              f"{r.get('speedup_over_eager_way', float('nan')):.2f}x | {r['build_seconds']:.1f} |")
    print("\n| spec | peak activations unpruned / prunec / eager way (MiB) | max abs logit diff prunec vs eager way |")
    print("|---|---|---|")
    for r in reports:
        peaks = " / ".join("n/a" if v is None else f"{v / 2**20:.0f}" for v in r["peak_activation_bytes"].values())
        print(f"| {r['spec']} | {peaks} | {r.get('eager_way_max_abs_diff', float('nan')):.1e} |")
    generated = [r for r in reports if "generation" in r]
    if generated:
        print(f"\n| spec | time to first token ms, unpruned / pruned | decode tokens/s, unpruned / pruned | "
              f"KV cache MiB, unpruned / pruned ({generated[0]['generation']['new_tokens']} new tokens) |")
        print("|---|---|---|---|")
        for r in generated:
            g = r["generation"]
            print(f"| {r['spec']} | {g['ttft_ms']['unpruned']:.0f} / {g['ttft_ms']['prunec']:.0f} | "
                  f"{g['decode_tokens_per_s']['unpruned']:.1f} / {g['decode_tokens_per_s']['prunec']:.1f} | "
                  f"{g['kv_cache_bytes']['unpruned'] / 2**20:.1f} / {g['kv_cache_bytes']['prunec'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
