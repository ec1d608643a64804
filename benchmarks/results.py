"""Regenerate docs/results.md: `prunec eval` of every preset that applies to a zoo task, at several
budgets, on held-out data (real trained weights, offline).

    OMP_NUM_THREADS=2 python benchmarks/results.py [--limit 200] [--keep 0.5 0.25 0.11] [--tasks ...]

Results accumulate in docs/results.json (a run skips what is recorded there; --fresh starts over),
and docs/results.md is rewritten from it after every evaluation, so an interrupted run keeps what
it measured. Budgets use `prunec eval --keep`: each stage's budget scaled so the last stage keeps
that share of the candidate tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

import prunec
from prunec.evals import ReferenceCache, evaluate, get_task, retained

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "digits-vqa": ["specs/fastv.yaml", "specs/divprune.yaml", "specs/fastervlm.yaml", "specs/visionzip.yaml",
                   "specs/holov.yaml", "specs/digits-vlm/pyramiddrop.yaml", "specs/digits-vlm/sparsevlm.yaml",
                   "specs/digits-vlm/transprune-high.yaml", "specs/vtc-cls.yaml", "specs/hiprune.yaml",
                   "specs/fopru.yaml", "specs/aim.yaml", "specs/digits-vlm/todre.yaml", "specs/digits-vlm/vflowopt.yaml",
                   "specs/catp.yaml", "specs/fastv-paper.yaml", "specs/transprune-ttv.yaml",
                   "specs/sparsevlm-recycle.yaml", "specs/recoverable.yaml", "specs/digits-vlm/vflowopt-llm.yaml",
                   "specs/random.yaml", "specs/pool.yaml", "specs/dart.yaml", "specs/vispruner.yaml",
                   "specs/vispruner-received.yaml", "specs/cdpruner.yaml"],
    "dinov2-probe": ["specs/tome.yaml", "specs/zero-tprune.yaml", "specs/flowcut.yaml", "specs/zero-tprune-si.yaml"],
    "smollm2-text": ["specs/fastv.yaml", "specs/lazyllm.yaml", "specs/spatten.yaml", "specs/a2sf.yaml",
                     "specs/fastv-paper.yaml", "specs/pyramiddrop.yaml", "specs/transprune-ttv.yaml"],
    "minilm-sim": [f"specs/minilm/{name}.yaml" for name in ("fastervlm", "vtc-cls", "divprune", "spatten", "flowcut",
                                                             "zero-tprune")],
}
SECONDARY = {"digits-vqa": "agreement", "dinov2-probe": "lfw_accuracy", "smollm2-text": "perplexity",
             "minilm-sim": "polarity_accuracy"}


def _training_summary() -> list[str]:
    """digits-vlm's projector, from its committed training log."""
    from prunec.zoo.digits_vlm import PROJECTOR_FILE

    log = PROJECTOR_FILE.with_suffix(".log.jsonl")
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    args, steps, final = rows[0]["args"], [r for r in rows if "step" in r], rows[-1]
    if "final_mnist_test_acc" not in final:
        return []
    n = final["test_examples"]
    return ["## digits-vlm", "",
            f"Projector trained by `python -m prunec.zoo.train_digits_projector` (seed {args['seed']}, {len(steps)} steps of "
            f"batch {args['batch']}, peak lr {args['lr']}, bf16 autocast: {args['bf16']}, {rows[0]['threads']} threads, "
            f"{steps[-1]['elapsed_s'] / 60:.0f} min) on {rows[0]['train_examples']} train images. Held-out accuracy of "
            f"the greedy answer (fp32): **{100 * final['final_mnist_test_acc']:.1f}% on MNIST ({n['mnist']} images), "
            f"{100 * final['final_sklearn_test_acc']:.1f}% on sklearn digits ({n['sklearn']})**; chance is 10%. Log: "
            "`prunec/zoo/weights/digits_vlm_projector.log.jsonl`.", ""]


BASELINES = ("specs/random.yaml", "specs/pool.yaml")


def _standard_error(accuracy: float, n: int) -> float:
    return (accuracy * (1 - accuracy) / n) ** 0.5


def _against_baselines(rows: list[dict], n: int) -> list[str]:
    """Per budget: the random and pooling baselines (accuracy +- binomial standard error over n examples)
    and the presets clearly above both (by more than 2 standard errors of the difference) or within noise."""
    measured = [r for r in rows if "error" not in r and r["metric"] == "accuracy"]
    lines = []
    for keep in sorted({r["keep"] for r in measured}, reverse=True):
        at = {r["spec"]: r["pruned"] for r in measured if r["keep"] == keep}
        if not all(b in at for b in BASELINES):
            continue
        floor = max(at[b] for b in BASELINES)
        floor_se = _standard_error(floor, n)

        def beyond(acc: float) -> bool:
            return acc - floor > 2 * (_standard_error(acc, n) ** 2 + floor_se ** 2) ** 0.5

        above = sorted((s for s in at if s not in BASELINES and at[s] > floor), key=lambda s: -at[s])
        clear = [f"{s.removeprefix('specs/')} {at[s]:.3f}" for s in above if beyond(at[s])]
        noise = [f"{s.removeprefix('specs/')} {at[s]:.3f}" for s in above if not beyond(at[s])]
        lines.append(f"- **keep {keep:.0%}**: random {at[BASELINES[0]]:.3f} +- {_standard_error(at[BASELINES[0]], n):.3f}, "
                     f"pooling {at[BASELINES[1]]:.3f} +- {_standard_error(at[BASELINES[1]], n):.3f}. Clearly above both "
                     f"(by > 2 standard errors): {', '.join(clear) or 'none'}; above but within noise: "
                     f"{', '.join(noise) or 'none'}; every other preset is at or below the better baseline.")
    if not lines:
        return []
    return ["", "**Against the baselines** (random and pooling as the floor; accuracy +- binomial standard error "
            f"over {n} examples; in-LLM schedules spend more FLOPs at the same *keep*, see the FLOPs column):", "",
            *lines]


def render(records: list[dict], meta: dict) -> str:
    lines = ["# Results on real trained weights", "",
             "Generated by `" + meta["command"] + "` (a run appends to `docs/results.json`; this page is "
             "rewritten from it). Every number below was measured by that script; nothing is copied from papers.",
             "", f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"{meta['threads']} threads. Held-out examples per row: {meta['limit']}.", "",
             "Columns: *keep* is the `--keep` target (share of candidate tokens the last stage keeps); *kept* is "
             "candidates per row after the last stage; *layer avg* is candidates per layer averaged over the pruned "
             "model's layers (the in-LLM papers' \"keep N\"); *FLOPs* is prunec's exact prefill count (vision tower "
             "and scoring included) as a share of the unpruned model's. A multi-stage in-LLM schedule reaches its *kept* count "
             "only at its last stage, so compare methods at equal *layer avg* or *FLOPs*, not at equal *keep*.", ""]
    lines += _training_summary()
    for task in RUNS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        t = get_task(task)
        second = SECONDARY[task]
        measured = next((r for r in rows if "error" not in r), None)
        metric = measured["metric"] if measured else "metric"
        lines += [f"## {task}", "", t.summary + ".", "",
                  f"| spec | keep | kept | layer avg | FLOPs | {metric} unpruned | pruned | retained | "
                  f"{second} unpruned | pruned |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['spec']} | {r['keep']:.0%} | not run: {r['error']} |||||||")
                continue
            lines.append(
                f"| {r['spec']} | {r['keep']:.0%} | {r['kept']}/{r['candidates']} | {r['layer_average']:g} | "
                f"{100 * r['flops_ratio']:.1f}% | {r['unpruned']:.4g} | {r['pruned']:.4g} | "
                f"{100 * r['retained']:.1f}% | {r['metrics_unpruned'][second]:.4g} | {r['metrics_pruned'][second]:.4g} |")
        lines += _against_baselines(rows, meta["limit"])
        done = {r["spec"] for r in rows}
        missing = [spec for spec in RUNS[task] if spec not in done]
        if missing:
            lines += ["", f"Not measured yet (the script's list, not run to the end): {', '.join(missing)}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.11])
    parser.add_argument("--tasks", nargs="+", default=list(RUNS))
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--render", action="store_true", help="only rewrite the page from the recorded JSON")
    args = parser.parse_args()
    if args.render:
        recorded = json.loads(args.json.read_text())
        args.out.write_text(render(recorded["records"], recorded["meta"]))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import transformers

    records = [] if args.fresh or not args.json.is_file() else json.loads(args.json.read_text())["records"]
    meta = {"command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/results.py --limit {args.limit}",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "limit": args.limit, "prunec": prunec.__version__}
    done = {(r["task"], r["spec"], r["keep"]) for r in records}
    for task in args.tasks:
        cache = ReferenceCache()
        for spec in RUNS[task]:
            for keep in args.keep:
                if (task, spec, keep) in done:
                    continue
                print(f"{task} {spec} keep {keep}", flush=True)
                try:
                    result = evaluate(ROOT / spec, task, limit=args.limit, keep=keep, cache=cache).as_dict()
                except Exception as exc:  # recorded as not run, with the reason, and the run goes on
                    reason = str(exc).splitlines()[0].replace(f"{ROOT}/", "")
                    result = {"task": task, "keep": keep, "error": f"{type(exc).__name__}: {reason[:240]}"}
                result["spec"] = spec
                # merge with what other runs recorded meanwhile (tasks may run in separate processes)
                on_disk = json.loads(args.json.read_text())["records"] if args.json.is_file() else []
                mine = {(r["task"], r["spec"], r["keep"]): r for r in on_disk}  # disk wins: others may have rerun
                mine[(task, spec, keep)] = result
                records = list(mine.values())
                order = {(t, s): i for i, (t, s) in enumerate((t, s) for t in RUNS for s in RUNS[t])}
                records.sort(key=lambda r: (order.get((r["task"], r["spec"]), 1 << 30), -r["keep"]))
                args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
                args.out.write_text(render(records, meta))
                if "error" not in result:
                    print(f"  {result['metric']} {result['unpruned']:.4f} -> {result['pruned']:.4f} "
                          f"({100 * retained(result['unpruned'], result['pruned'], result['metric']):.1f}%), "
                          f"kept {result['kept']}/{result['candidates']}, FLOPs {100 * result['flops_ratio']:.1f}%, "
                          f"{result['seconds']}", flush=True)


if __name__ == "__main__":
    main()
