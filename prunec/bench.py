"""`prunec bench`: measured prefill speedup of an emitted module against its FLOPs ideal.

Three ways run on the same inputs, alternating (A B C A B C ...) after a warm-up, so drift in the
machine hits all of them alike: the unpruned model (HF, sdpa), the emitted module, and the
eager-attention way the forks use (`eager_way.py`). Reported: medians, measured speedup, the ideal
speedup (1 / exact prefill FLOPs ratio), efficiency = measured / ideal, the share of the pruned
prefill spent inside prunec's ops (torch profiler), peak activation memory, and whether the
emitted module and the eager way agree (they make the same selection).
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .adapters.base import ExampleShape
from .eager_way import EagerWay, unsupported_reason
from .emit import versions
from .flops import estimate
from .models import load_model
from .spec import Plan


def _timed(fn: Callable, inputs: tuple) -> float:
    start = time.perf_counter()
    fn(*inputs)
    return time.perf_counter() - start


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native start/stop lines go to fd 2; keep them off the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _profile(fn: Callable, inputs: tuple) -> tuple[float, float, int | None]:
    """(wall seconds, seconds inside top-level prunec:: ops, peak bytes allocated during the call)."""
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        start = time.perf_counter()
        fn(*inputs)
        wall = time.perf_counter() - start
    events = prof.events()
    inside = 0.0
    spans: list[tuple[int, int]] = []
    for event in events:
        if event.name.startswith("prunec::"):
            interval = (event.time_range.start, event.time_range.end)
            if not any(s <= interval[0] and interval[1] <= e for s, e in spans):  # nested: count once
                spans.append(interval)
                inside += event.cpu_time_total / 1e6
    return wall, inside, _peak_bytes(prof)


def _peak_bytes(prof) -> int | None:
    """Highest running sum of the allocations and frees the profiler saw (activations, not weights)."""
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    live = peak = 0
    for event in sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 2)


def _generation(artifacts: dict[str, Path], inputs: tuple, new_tokens: int, rounds: int) -> dict:
    """Time to first token and decode tokens/s of prunec's generation path, unpruned vs pruned,
    alternating; KV-cache bytes as the prefill returns them."""
    from .generate import Generator

    generators = {name: Generator(path) for name, path in artifacts.items()}
    ttft: dict[str, list[float]] = {name: [] for name in generators}
    decode: dict[str, list[float]] = {name: [] for name in generators}
    kv_bytes = {}
    for name, generator in generators.items():  # warm-up, and the cache sizes
        _, keys, values, _ = generator.prefill_caches(*inputs)
        kv_bytes[name] = sum(t.numel() * t.element_size() for t in keys + values)
        generator.generate(*inputs, max_new_tokens=2, eos_token_id=None)
    for _ in range(rounds):
        for name, generator in generators.items():
            first = _timed(generator.prefill_caches, inputs)
            total = _timed(lambda *x: generator.generate(*x, max_new_tokens=new_tokens, eos_token_id=None), inputs)
            ttft[name].append(first)
            decode[name].append(max(total - first, 1e-9))
    return {
        "new_tokens": new_tokens,
        "ttft_ms": {name: _median_ms(samples) for name, samples in ttft.items()},
        "decode_tokens_per_s": {name: round((new_tokens - 1) / statistics.median(samples), 2)
                                for name, samples in decode.items()},
        "kv_cache_bytes": kv_bytes,
        "note": "both sides run prunec's prefill + decode-step programs (the unpruned one from a keep-everything "
                "build of the same model); decode time = generate time - prefill time",
    }


def run_bench(plan: Plan, artifact: Path, build_seconds: float | None, rounds: int = 10, warmup: int = 2,
              eager: bool = True, unpruned_artifact: Path | None = None, new_tokens: int = 32) -> dict:
    """Time the three ways on the spec's example inputs; the returned dict is `--json`'s output."""
    from . import load

    shape = plan.lock["inputs"]
    inputs = plan.adapter.example_inputs(ExampleShape(
        shape["batch"], shape.get("seq_len"), shape.get("image_size"), shape.get("images", 1)), shape["seed"])
    model = load_model(plan.lock["model"], plan.spec.base_dir)
    unpruned = plan.adapter.wrap(model, plan.lock.get("output")).eval()
    ways: dict[str, Callable] = {"unpruned": unpruned, "prunec": load(artifact)}
    eager_reason = unsupported_reason(plan) if eager else "not requested (--no-eager)"
    if eager_reason is None:
        eager_model = load_model(plan.lock["model"], plan.spec.base_dir)
        ways["eager way"] = EagerWay(eager_model, plan)
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        outputs = {name: fn(*inputs) for name, fn in ways.items()}
        for _ in range(warmup - 1):
            for fn in ways.values():
                fn(*inputs)
        for _ in range(rounds):
            for name, fn in ways.items():
                times[name].append(_timed(fn, inputs))
        profiled = {name: _profile(fn, inputs) for name, fn in ways.items()}
    flops = estimate(plan)
    ideal = 1.0 / flops["exact"]["prefill_flops"]["ratio"]
    medians = {name: _median_ms(samples) for name, samples in times.items()}
    speedup = medians["unpruned"] / medians["prunec"]
    wall, inside, _ = profiled["prunec"]
    report = {
        "spec": plan.spec.name,
        "inputs": {k: plan.lock["inputs"][k] for k in ("batch", "seq_len", "image_size") if k in plan.lock["inputs"]},
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(),
        "rounds": rounds,
        "median_ms": medians,
        "samples_ms": {name: [round(t * 1e3, 2) for t in samples] for name, samples in times.items()},
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "ideal_convention": flops["exact"]["convention"],
        "paper_style_flops": flops["paper_style"],
        "efficiency": round(speedup / ideal, 3),
        "prunec_ops_ms": round(inside * 1e3, 2),
        "prunec_ops_share": round(inside / wall, 4) if wall else 0.0,
        "scoring_flops_share": round(flops["exact"]["scoring_flops"] / flops["exact"]["prefill_flops"]["pruned"], 4),
        "peak_activation_bytes": {name: prof[2] for name, prof in profiled.items()},
        "build_seconds": None if build_seconds is None else round(build_seconds, 2),
    }
    if unpruned_artifact is not None:
        report["generation"] = _generation({"unpruned": unpruned_artifact, "prunec": artifact}, inputs,
                                           new_tokens, max(1, rounds // 2))
    if "eager way" in ways:
        report["speedup_over_eager_way"] = round(medians["eager way"] / medians["prunec"], 3)
        report["eager_way_max_abs_diff"] = float((outputs["eager way"] - outputs["prunec"]).abs().max())
    else:
        report["eager_way"] = eager_reason
    return report


def bench_spec(spec_path: str | Path, rounds: int = 10, warmup: int = 2, eager: bool = True,
               new_tokens: int = 32) -> dict:
    """Build the spec into a temporary directory (timing the build), then `run_bench`. A spec with
    `decode:` also gets a keep-everything build of the same model, for the generation timings."""
    from . import build, plan as make_plan
    from .semantics import dump_lock

    plan = make_plan(spec_path)
    with tempfile.TemporaryDirectory(prefix="prunec-bench-") as scratch:
        start = time.perf_counter()
        artifact = build(spec_path, scratch)
        build_seconds = time.perf_counter() - start
        unpruned = None
        if "decode" in plan.lock:
            lock = {**plan.lock, "name": f"{plan.lock['name']}-unpruned", "pipeline": []}
            spec = Path(scratch) / "unpruned.yaml"
            spec.write_text(dump_lock(lock))
            unpruned = build(spec, Path(scratch) / "unpruned")
        return run_bench(plan, artifact, build_seconds, rounds=rounds, warmup=warmup, eager=eager,
                         unpruned_artifact=unpruned, new_tokens=new_tokens)


def format_report(report: dict) -> str:
    names = list(report["median_ms"])
    lines = [
        f"{report['spec']}: inputs {report['inputs']}, {report['threads']} thread(s), {report['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k in ("torch", "transformers")),
        f"{report['rounds']} rounds, alternating {' / '.join(names)}; medians:",
    ]
    for name in names:
        peak = report["peak_activation_bytes"][name]
        memory = "n/a" if peak is None else f"{peak / 2**20:8.2f} MiB"
        lines.append(f"  {name:<10} {report['median_ms'][name]:>10.1f} ms   peak activations {memory}")
    lines.append(f"speedup {report['speedup']:.2f}x, ideal {report['ideal_speedup']:.2f}x "
                 f"(exact prefill FLOPs), efficiency {report['efficiency']:.2f}")
    lines.append(f"prunec ops: {report['prunec_ops_ms']:.2f} ms = {report['prunec_ops_share']:.2%} of the pruned prefill")
    if report["scoring_flops_share"]:
        lines.append(f"recomputed next-layer q/k for scoring (outside prunec ops): "
                     f"{report['scoring_flops_share']:.2%} of the pruned prefill FLOPs")
    if "speedup_over_eager_way" in report:
        lines.append(f"over the eager-attention way: {report['speedup_over_eager_way']:.2f}x "
                     f"(same selection; max |logit diff| {report['eager_way_max_abs_diff']:.1e})")
    else:
        lines.append(f"eager-attention way: {report['eager_way']}")
    if "generation" in report:
        g = report["generation"]
        lines.append(f"generation, {g['new_tokens']} new tokens (prunec's decode path, unpruned vs pruned):")
        for name in g["ttft_ms"]:
            lines.append(f"  {name:<10} time to first token {g['ttft_ms'][name]:>9.1f} ms   decode "
                         f"{g['decode_tokens_per_s'][name]:>8.1f} tokens/s   KV cache "
                         f"{g['kv_cache_bytes'][name] / 2**20:8.2f} MiB")
    if report["build_seconds"] is not None:
        lines.append(f"build: {report['build_seconds']:.1f} s")
    return "\n".join(lines)
