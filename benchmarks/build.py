"""Build time and artifact size, by phase, optionally against another prunec checkout side by side.

    OMP_NUM_THREADS=1 python benchmarks/build.py SPEC [SPEC ...] [--rounds 3] [--compare-to DIR] [--json out.json]

Each round builds each spec in a fresh Python process (imports not counted) and reports the phases
(plan, model: building or loading the weights, capture, the passes, generation programs, emit) and
the artifact's size on disk next to the model's weights (parameters and buffers, bytes). With
`--compare-to DIR` (a checkout of another prunec, e.g. `git worktree add DIR HEAD~1`), the two
run alternately (A B A B ...) so machine drift hits both alike; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ONE_BUILD = r"""
import json, sys, time
from pathlib import Path
import torch
import prunec
from prunec.compiler import compile_plan
from prunec.emit import emit
from prunec.models import load_model

spec, out = sys.argv[1], Path(sys.argv[2])
t0 = time.perf_counter()
plan = prunec.plan(spec)
t1 = time.perf_counter()
model = load_model(plan.lock["model"], plan.spec.base_dir)
t2 = time.perf_counter()
compiled = compile_plan(plan, model)
t3 = time.perf_counter()
artifact = emit(compiled, model, out)
t4 = time.perf_counter()
weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
print(json.dumps({"plan_s": t1 - t0, "model_s": t2 - t1, "compile_s": t3 - t2, "emit_s": t4 - t3,
                  "total_s": t4 - t0, "phases": compiled.timings,
                  "artifact_bytes": sum(f.stat().st_size for f in artifact.iterdir()),
                  "files": {f.name: f.stat().st_size for f in sorted(artifact.iterdir())},
                  "weights_bytes": sum(weights.values()), "prunec": prunec.__file__}))
"""


def build_once(spec: Path, checkout: Path | None) -> dict:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run([sys.executable, "-c", ONE_BUILD, str(spec), scratch], env=env, capture_output=True,
                              text=True, cwd=spec.parent)
    if proc.returncode != 0:
        raise SystemExit(f"building {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    median = lambda key: statistics.median(r[key] for r in runs)
    last = runs[-1]
    return {"rounds": len(runs), **{k: round(median(k), 2) for k in ("plan_s", "model_s", "compile_s", "emit_s", "total_s")},
            "phases": {k: round(statistics.median(r["phases"].get(k, 0.0) for r in runs), 2) for k in last["phases"]},
            "artifact_bytes": last["artifact_bytes"], "weights_bytes": last["weights_bytes"],
            "artifact_over_weights": round(last["artifact_bytes"] / last["weights_bytes"], 3), "files": last["files"],
            "prunec": last["prunec"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-to", type=Path, help="another prunec checkout, run alternately with this one")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sides = {"this": None, **({"other": args.compare_to.resolve()} if args.compare_to else {})}
    report = {}
    for spec in args.specs:
        runs = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, checkout in sides.items():
                runs[side].append(build_once(spec.resolve(), checkout))
        report[str(spec)] = {side: summary(r) for side, r in runs.items()}
        for side, s in report[str(spec)].items():
            print(f"{spec} [{side}: {s['prunec']}] total {s['total_s']} s (plan {s['plan_s']}, model {s['model_s']}, "
                  f"compile {s['compile_s']}, emit {s['emit_s']}); artifact {s['artifact_bytes'] / 2**20:.1f} MiB = "
                  f"{s['artifact_over_weights']}x the weights ({s['weights_bytes'] / 2**20:.1f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
