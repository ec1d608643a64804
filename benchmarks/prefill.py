"""Prefill time of emitted artifacts on a LLaVA-shaped model (CPU), and the prunec ops' share.

Model: CLIP-style tower at 336 px / patch 14 (576 image tokens, 2 layers, hidden 256) + an 8-layer,
1024-hidden Llama (168M params) with seeded random weights; one row of 640 tokens. Artifacts are
timed side by side, A B A B, best of the rounds. The ops' share is measured by timing each prunec op
node inside one run of the pruned program.

    OMP_NUM_THREADS=1 python benchmarks/prefill.py
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import fx

import prunec
from prunec.adapters.base import ExampleShape

ROUNDS = 5
CONFIG = {
    "model_type": "llava", "image_token_id": 31999, "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 336, "patch_size": 14,
                      "projection_dim": 256},
    "text_config": {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
                    "max_position_embeddings": 2048, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}
PIPELINES = {
    "unpruned": "[]",
    "fastv K=2 keep 25%": "[{site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.25}}]",
    "divprune keep 25%": "[{site: projector.output, method: divprune, keep: {ratio: 0.25}}]",
    "divprune keep 11%": "[{site: projector.output, method: divprune, keep: {ratio: 0.11}}]",
}


def build_all(root: Path) -> dict[str, tuple[Path, float]]:
    (root / "config.json").write_text(json.dumps(CONFIG))
    out = {}
    for i, (label, pipeline) in enumerate(PIPELINES.items()):
        spec = root / f"s{i}.yaml"
        spec.write_text(f"prunec: 1\nname: b{i}\nmodel: {{config: config.json, seed: 0}}\n"
                        f"inputs: {{batch: 1, seq_len: 640}}\npipeline: {pipeline}\n")
        start = time.perf_counter()
        artifact = prunec.build(spec, root / "out")
        out[label] = (artifact, time.perf_counter() - start)
    return out


def op_seconds(module: fx.GraphModule, inputs) -> float:
    spent = [0.0]

    class Timer(fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and str(node.target).startswith("prunec."):
                start = time.perf_counter()
                result = super().run_node(node)
                spent[0] += time.perf_counter() - start
                return result
            return super().run_node(node)

    with torch.no_grad():
        Timer(module).run(*inputs)
    return spent[0]


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = build_all(Path(scratch))
        plan = prunec.plan(artifacts["unpruned"][0] / "spec.lock.yaml")
        inputs = plan.adapter.example_inputs(ExampleShape(1, 640, 336), 0)
        modules = {label: prunec.load(path) for label, (path, _) in artifacts.items()}
        times = {label: [] for label in modules}
        with torch.no_grad():
            for module in modules.values():
                module(*inputs)  # warm-up
            for _ in range(ROUNDS):  # A B C D A B C D ...
                for label, module in modules.items():
                    start = time.perf_counter()
                    module(*inputs)
                    times[label].append(time.perf_counter() - start)
        shares = {label: op_seconds(module, inputs) for label, module in modules.items() if label != "unpruned"}
    base = min(times["unpruned"])
    print(f"# prefill, batch 1 x 640 tokens (576 image), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, best of {ROUNDS}")
    print("| artifact | build s | prefill ms (best) | median ms | speedup vs unpruned | prunec ops ms | ops share |")
    print("|---|---|---|---|---|---|---|")
    for label, samples in times.items():
        best = min(samples)
        ops = shares.get(label)
        print(f"| {label} | {artifacts[label][1]:.1f} | {best * 1e3:.0f} | {statistics.median(samples) * 1e3:.0f} | "
              f"{base / best:.2f}x | {'-' if ops is None else f'{ops * 1e3:.1f}'} | "
              f"{'-' if ops is None else f'{ops / best:.1%}'} |")


if __name__ == "__main__":
    main()
