"""`prunec eval`: a spec's pipeline applied to a real zoo model, scored on a held-out task against
the unpruned model (the Hugging Face model run eagerly, not through prunec).

A task names its zoo model, the example inputs to capture with, its batches and its metrics. The
spec's pipeline is kept; its model, inputs and output are replaced by the task's (so the tiny-model
presets in `specs/` evaluate as written), and `keep=` rescales every stage's budget so the last
stage keeps that share of the candidate tokens (the schedule's shape is kept).
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml

from ..errors import PrunecError
from ..schedule import scaled_counts

Batch = tuple[tuple[torch.Tensor, ...], Any]  # (model inputs, labels)


class Task:
    """One evaluation: what to run on (`zoo`), with which inputs, and how to score outputs."""

    name: str
    zoo: str
    summary: str
    output: dict = {}     # the spec's `output:` the task needs (e.g. only the last position's logits)

    def capture_inputs(self, model_dir: Path) -> dict:
        """The spec's `inputs:` block for this task's batches."""
        raise NotImplementedError

    def batches(self, model_dir: Path, limit: int | None, batch_size: int) -> list[Batch]:
        raise NotImplementedError

    def example_count(self, labels: Any) -> int:
        return len(labels)

    def fit(self, reference: Callable[[Iterable[Batch]], list[torch.Tensor]], model_dir: Path) -> None:
        """Learn what the metric needs from unpruned outputs (e.g. a linear probe), once per process;
        default none."""

    def metrics(self, outputs: list[torch.Tensor], labels: list[Any], reference: list[torch.Tensor]) -> dict:
        """{metric: value}; the first is the headline. `reference` is the unpruned outputs."""
        raise NotImplementedError


TASKS: dict[str, Task] = {}


def register_task(cls):
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    from . import digits_vqa, dinov2_probe, minilm_sim, smollm2_text  # noqa: F401  (registration)

    if name not in TASKS:
        raise PrunecError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


@dataclass
class EvalResult:
    spec: str
    task: str
    examples: int
    metrics_unpruned: dict
    metrics_pruned: dict
    candidates: int               # candidate tokens per row before pruning
    kept: int                     # after the last stage
    layer_average: float          # candidates per layer, averaged over the pruned domain's layers
    flops_ratio: float            # prefill FLOPs pruned / unpruned (prunec's exact count)
    keep: float | None
    seconds: dict = field(default_factory=dict)

    def headline(self) -> tuple[str, float, float]:
        name = next(iter(self.metrics_unpruned))
        return name, self.metrics_unpruned[name], self.metrics_pruned[name]

    def as_dict(self) -> dict:
        name, before, after = self.headline()
        return {"spec": self.spec, "task": self.task, "examples": self.examples, "keep": self.keep,
                "metric": name, "unpruned": before, "pruned": after, "retained": retained(before, after, name),
                "candidates": self.candidates, "kept": self.kept, "layer_average": self.layer_average,
                "flops_ratio": self.flops_ratio, "metrics_unpruned": self.metrics_unpruned,
                "metrics_pruned": self.metrics_pruned, "seconds": self.seconds}


def retained(before: float, after: float, metric: str) -> float:
    """Pruned as a share of unpruned; for lower-is-better metrics (perplexity) the inverse."""
    if metric.startswith("perplexity"):
        return before / after if after else math.nan
    return after / before if before else math.nan


def task_spec(spec_data: dict, task: Task, model_dir: Path) -> dict:
    """The spec with the task's model, capture inputs and output; pipeline untouched."""
    data = {k: v for k, v in spec_data.items() if k not in ("extends", "decode", "output", "inputs", "model")}
    data["model"] = {"zoo": task.zoo}
    data["inputs"] = task.capture_inputs(model_dir)
    if task.output:
        data["output"] = dict(task.output)
    return data


def rescale(data: dict, plan, keep: float) -> dict:
    """Every stage's budget scaled by one factor so the last stage that keeps candidates keeps `keep`
    of those the first stage saw (`schedule.scaled_counts`: half up, at least 1). Stages that drop every candidate stay so.
    Budgets become counts (a `budget: {layer_average}` target gives way to them)."""
    stages = list(plan.stages)
    if not stages:
        return data
    if any(s.query_tokens for s in stages):
        raise PrunecError("keep= rescales whole-row counts; image-scoped stages need their counts written")
    first = stages[0].n_candidates
    last = next((s.n_keep for s in reversed(stages) if s.n_keep), 0)
    if last == 0:
        raise PrunecError("every stage drops all candidates; keep= has nothing to rescale")
    factor = keep * first / last
    counts: dict[str, list[int]] = {}
    for stage, count in zip(stages, scaled_counts([s.n_keep for s in stages], first, factor)):
        counts.setdefault(stage.pointer, []).append(count)
    data = yaml.safe_load(yaml.safe_dump(data))
    data.pop("budget", None)
    pipeline = data["pipeline"]
    for pointer, values in counts.items():
        entry = pipeline[int(pointer.rsplit("/", 1)[1])]
        entry["keep"] = {"count": values if len(values) > 1 or isinstance(entry.get("site"), list) else values[0]}
    return data


class ReferenceCache:
    """Unpruned outputs per (task, limit, batch size): shared by every spec evaluated in one process."""

    def __init__(self):
        self._outputs: dict[tuple, list[torch.Tensor]] = {}

    def get(self, key: tuple, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        if key not in self._outputs:
            self._outputs[key] = compute()
        return self._outputs[key]


def _plan(path: Path, data: dict, spec_path, task: Task):
    """Plan the task's version of the spec; a spec that does not fit the task's model says so."""
    import prunec
    from ..errors import SpecError, SpecErrors

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        return prunec.plan(path)
    except (SpecError, SpecErrors) as exc:
        errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
        problems = "; ".join(f"{e.location.pointer if e.location else '/'}: {e.message}" for e in errors)
        raise PrunecError(f"{spec_path} does not apply to task {task.name} (model {task.zoo}): {problems}") from None


def _run(module, batches: Iterable[Batch]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [module(*inputs) for inputs, _ in batches]


def _zoo_state(name: str) -> list:
    """What the task's zoo model was built from: its marker (fingerprint, packages) and the installed
    versions of those packages."""
    from importlib import metadata

    from .. import zoo

    marker = zoo.path(name) / zoo.MARKER
    installed = {}
    for package in zoo.entry(name).packages:
        try:
            installed[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed[package] = None
    return [marker.read_text() if marker.is_file() else None, installed]


def _prunec_source_digest() -> str:
    """sha256 over prunec's own source files: any change to the compiler invalidates cached builds."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _cached_build(plan, derived: Path, task: Task, rebuild: bool, note: Callable[[str], None]):
    """The task's build of the spec, reused from the cache (`$PRUNEC_CACHE/eval-builds/`) when the
    same resolved spec was built on the same zoo model by this prunec; rebuilt when it was not, when
    `rebuild`, or when the cached artifact no longer loads (its method code changed, say)."""
    import hashlib

    import prunec
    from .. import zoo
    from ..emit import versions

    key = hashlib.sha256(json.dumps([plan.spec_hash, _zoo_state(task.zoo), versions(), _prunec_source_digest()],
                                    sort_keys=True).encode()).hexdigest()
    root = zoo.cache_dir() / "eval-builds" / key[:24]
    artifact = root / plan.lock["name"]
    if not rebuild and artifact.is_dir():
        try:
            module = prunec.load(artifact)
            note(f"using the cached build {artifact}")
            return module, True
        except PrunecError as exc:  # damaged, or its method code changed since (CodeChangedError)
            note(f"rebuilding: the cached build does not load ({exc})")
    note(f"building {plan.lock['name']} on {task.zoo}")
    return prunec.load(prunec.build(derived, root)), False


def evaluate(spec_path: str | Path, task_name: str, limit: int | None = None, keep: float | None = None,
             batch_size: int = 16, cache: ReferenceCache | None = None,
             note: Callable[[str], None] = lambda message: None, rebuild: bool = False) -> EvalResult:
    import prunec
    from .. import flops, zoo
    from ..models import load_model
    from ..spec import load_spec

    task = get_task(task_name)
    model_dir = zoo.prepare(task.zoo, note)
    timings = {}
    with tempfile.TemporaryDirectory(prefix="prunec-eval-") as scratch:
        derived = Path(scratch) / "spec.yaml"
        data = task_spec(load_spec(Path(spec_path)).data, task, model_dir)
        plan = _plan(derived, data, spec_path, task)
        if keep is not None:
            plan = _plan(derived, rescale(data, plan, keep), spec_path, task)
        start = time.perf_counter()
        module, reused = _cached_build(plan, derived, task, rebuild, note)
        timings["build_s" if not reused else "load_cached_build_s"] = round(time.perf_counter() - start, 1)

        batches = task.batches(model_dir, limit, batch_size)
        cache = cache or ReferenceCache()
        hf = None

        def reference_module():
            nonlocal hf
            if hf is None:
                hf = plan.adapter.wrap(load_model(plan.lock["model"], plan.spec.base_dir), task.output)
            return hf

        start = time.perf_counter()
        task.fit(lambda fit_batches: _run(reference_module(), fit_batches), model_dir)
        reference = cache.get((task.name, limit, batch_size), lambda: _run(reference_module(), batches))
        timings["unpruned_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        examples = sum(task.example_count(labels) for _, labels in batches)
        note(f"running {examples} examples")
        outputs = _run(module, batches)
        timings["pruned_s"] = round(time.perf_counter() - start, 1)

    labels = [labels for _, labels in batches]
    stages = plan.stages
    candidates = stages[0].n_candidates if stages else plan.adapter.initial_candidates_from_config(
        plan.lock["inputs"], plan.adapter.protectable)  # a stage's default protection
    estimate = flops.estimate(plan)
    return EvalResult(
        spec=str(spec_path), task=task.name, examples=examples,
        metrics_unpruned=task.metrics(reference, labels, reference),
        metrics_pruned=task.metrics(outputs, labels, reference),
        candidates=candidates, kept=stages[-1].n_keep if stages else candidates,
        layer_average=next(iter(estimate["layer_average_candidates"].values())),
        flops_ratio=estimate["exact"]["prefill_flops"]["ratio"], keep=keep, seconds=timings)


def table(results: list[EvalResult]) -> str:
    """A paper-style table: metric unpruned / pruned / retained, tokens kept, FLOPs."""
    header = ["spec", "task", "metric", "unpruned", "pruned", "retained", "tokens kept", "layer avg", "FLOPs"]
    rows = [header]
    for r in results:
        name, before, after = r.headline()
        rows.append([Path(r.spec).stem, r.task, name, f"{before:.4g}", f"{after:.4g}",
                     f"{100 * retained(before, after, name):.1f}%", f"{r.kept}/{r.candidates}",
                     f"{r.layer_average:g}", f"{100 * r.flops_ratio:.1f}%"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
