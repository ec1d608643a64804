"""Run-time budgets on a LLaVA-NeXT-shaped workload (2,880 image tokens per row) and ragged rows.

    OMP_NUM_THREADS=1 python benchmarks/ragged.py [--rounds N] [--json docs/benchmarks-ragged.json]
    python benchmarks/ragged.py --from-json docs/benchmarks-ragged.json   # re-print a recorded run

1. `prunec bench` on specs/next-shaped-fastv-k2-keep25.yaml: one row of 5 images (2,880 image tokens
   + 64 text), unpruned vs the emitted module vs the eager-attention way, alternating (A B C).
2. A batch of 4 rows holding 2, 3, 4 and 5 images (left-padded), each keeping 25% of its own image
   tokens: the batch run at once vs each row run alone, unpruned and pruned, alternating. The ideal
   speedups count transformer-layer MACs (4nd^2 + 2n^2d + 3ndm per layer and row, the vision tower
   and projector added unchanged) over the padded batch, and over each row's own tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SPEC = Path(__file__).parent / "specs" / "next-shaped-fastv-k2-keep25.yaml"
IMAGES = (2, 3, 4, 5)
TEXT = 64


def _rows(plan, images_per_row, seed=0):
    config = plan.adapter.config
    gen = torch.Generator().manual_seed(seed)
    per_image = plan.adapter.image_tokens_per_image()
    side = config.vision_config.image_size
    rows = []
    for images in images_per_row:
        ids = torch.randint(3, config.image_token_id, (images * per_image + TEXT,), generator=gen)
        ids[2:2 + images * per_image] = config.image_token_id
        rows.append((ids, torch.randn(images, 3, side, side, generator=gen)))
    length = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (row, _) in enumerate(rows):
        ids[b, length - len(row):] = row
        mask[b, length - len(row):] = 1
    return (ids, mask, torch.cat([p for _, p in rows])), [(r[None], torch.ones_like(r)[None], p) for r, p in rows]


def _layer_macs(config, n: int) -> int:
    d, m = config.hidden_size, config.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def _ideals(plan, batch, ratio: float, site_layer: int) -> dict:
    text = plan.adapter.config.text_config
    layers = text.num_hidden_layers
    per_image = plan.adapter.image_tokens_per_image()
    fixed = sum(plan.adapter.fixed_macs({"image_size": plan.lock["inputs"]["image_size"], "images": 1}).values())
    lengths = batch[1].sum(dim=1).tolist()
    kept = [n - images * per_image + round(ratio * images * per_image) for n, images in zip(lengths, IMAGES)]
    before, after = site_layer + 1, layers - site_layer - 1
    tower = fixed * sum(IMAGES)
    padded, kept_padded = batch[0].shape[1], max(kept)  # a ragged stage drops the inputs' padding too
    unpruned_padded = tower + len(IMAGES) * layers * _layer_macs(text, padded)
    pruned_padded = tower + len(IMAGES) * (before * _layer_macs(text, padded) + after * _layer_macs(text, kept_padded))
    unpruned_rows = tower + sum(layers * _layer_macs(text, n) for n in lengths)
    pruned_rows = tower + sum(before * _layer_macs(text, n) + after * _layer_macs(text, k) for n, k in zip(lengths, kept))
    return {"row_tokens": lengths, "row_kept": kept, "padded_tokens": padded, "padded_kept_tokens": kept_padded,
            "ideal_batch": round(unpruned_padded / pruned_padded, 3), "ideal_rows": round(unpruned_rows / pruned_rows, 3)}


def ragged_batch(rounds: int) -> dict:
    import prunec
    from prunec.models import load_model

    plan = prunec.plan(SPEC)
    with tempfile.TemporaryDirectory(prefix="prunec-ragged-") as scratch:
        module = prunec.load(prunec.build(SPEC, scratch))
        model = plan.adapter.wrap(load_model(plan.lock["model"], plan.spec.base_dir), plan.lock.get("output")).eval()
        batch, alone = _rows(plan, IMAGES)
        ways = {"unpruned batch": lambda: model(*batch), "prunec batch": lambda: module(*batch),
                "unpruned rows alone": lambda: [model(*row) for row in alone],
                "prunec rows alone": lambda: [module(*row) for row in alone]}
        samples = {name: [] for name in ways}
        with torch.no_grad():
            together, single = module(*batch), [module(*row) for row in alone]
            diff = max(float((together[b, -1] - out[0, -1]).abs().max()) for b, out in enumerate(single))
            for _ in range(rounds):
                for name, run in ways.items():
                    start = time.perf_counter()
                    run()
                    samples[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    return {"images_per_row": list(IMAGES), "median_ms": medians, "samples_ms": samples,
            "max_abs_diff_batch_vs_alone": diff, **_ideals(plan, batch, 0.25, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path)
    parser.add_argument("--one-row-from", type=Path, help="take part 1 from a recorded run (rerun part 2 only)")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
    else:
        from prunec.bench import bench_spec
        from prunec.emit import versions

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
                  "versions": versions(), "rounds": args.rounds,
                  "one_row": (json.loads(args.one_row_from.read_text())["one_row"] if args.one_row_from
                              else bench_spec(SPEC, rounds=args.rounds)),
                  "ragged_batch": ragged_batch(args.rounds)}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)


def print_tables(report: dict) -> None:
    one, batch = report["one_row"], report["ragged_batch"]
    m = one["median_ms"]
    print(f"{report['machine']}, {report['threads']} thread(s), torch {report['versions']['torch']}, "
          f"transformers {report['versions']['transformers']}, {report['rounds']} rounds, medians\n")
    print("| workload | unpruned ms | prunec ms | eager way ms | speedup | ideal | efficiency | over eager way | "
          "peak activations unpruned / prunec / eager way (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    peaks = " / ".join("n/a" if v is None else f"{v / 2**20:.0f}" for v in one["peak_activation_bytes"].values())
    print(f"| 1 row, 2,944 tokens | {m['unpruned']:.0f} | {m['prunec']:.0f} | {m.get('eager way', float('nan')):.0f} | "
          f"{one['speedup']:.2f}x | {one['ideal_speedup']:.2f}x | {one['efficiency']:.2f} | "
          f"{one.get('speedup_over_eager_way', float('nan')):.2f}x | {peaks} |")
    b = batch["median_ms"]
    print(f"\nRagged batch: rows of {batch['images_per_row']} images = {batch['row_tokens']} tokens, keeping "
          f"{batch['row_kept']} (padded: {batch['padded_tokens']} -> {batch['padded_kept_tokens']}); "
          f"max |logit diff| batch vs rows alone {batch['max_abs_diff_batch_vs_alone']:.1e}\n")
    print("| | unpruned ms | prunec ms | speedup | ideal (layer MACs) |")
    print("|---|---|---|---|---|")
    print(f"| batch of 4 at once | {b['unpruned batch']:.0f} | {b['prunec batch']:.0f} | "
          f"{b['unpruned batch'] / b['prunec batch']:.2f}x | {batch['ideal_batch']:.2f}x (padded rows) |")
    print(f"| each row alone, summed | {b['unpruned rows alone']:.0f} | {b['prunec rows alone']:.0f} | "
          f"{b['unpruned rows alone'] / b['prunec rows alone']:.2f}x | {batch['ideal_rows']:.2f}x (own tokens) |")


if __name__ == "__main__":
    main()
