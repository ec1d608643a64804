"""The `prunec` command line. Spec and build errors print one line per problem and exit 2."""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import PrunecError, SpecError, SpecErrors
from .files import write_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="prunec: compile YAML token-pruning specs into rewritten, exported models.")

EXIT_USER_ERROR = 2


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"prunec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """prunec: compile YAML token-pruning specs into rewritten, exported models."""


def _fail(exc: PrunecError) -> None:
    if isinstance(exc, SpecErrors):
        lines = [e.format() for e in exc.errors]
    elif isinstance(exc, SpecError):
        lines = [exc.format()]
    else:
        lines = [f"error: {exc}"]
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(EXIT_USER_ERROR)


@app.command()
def validate(spec: Path = typer.Argument(..., help="spec file")) -> None:
    """Validate a spec (YAML, schema, semantics against the model). Exit 0 if valid, 2 if not."""
    from . import plan

    try:
        the_plan = plan(spec)
    except PrunecError as exc:
        _fail(exc)
    typer.echo(f"ok: {spec} ({the_plan.adapter.family}, {len(the_plan.stages)} stage(s))")


@app.command()
def explain(spec: Path = typer.Argument(..., help="spec file"),
            image_size: Optional[list[str]] = typer.Option(
                None, "--image-size", help="HxW (repeatable): the schedule for images of these sizes, one per row "
                                           "(families whose token count follows the image size)")) -> None:
    """Show each stage: site, method, tokens in and out, and the FLOPs they leave."""
    from . import plan
    from .explain import size_table, stage_table

    try:
        sizes = [_image_size(text) for text in image_size or []]
        the_plan = plan(spec)
        per_size = size_table(the_plan, sizes) if sizes else None
        typer.echo(stage_table(the_plan))
        if per_size:
            typer.echo(per_size)
    except PrunecError as exc:
        _fail(exc)


def _image_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit()) or not int(height) or not int(width):
        raise PrunecError(f"--image-size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 672x336")
    return int(height), int(width)


@app.command()
def build(spec: Path = typer.Argument(..., help="spec file"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory (default: spec's output.dir or build)"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="print only the artifact path")) -> None:
    """Compile a spec into DIR/<name>/ (model.pt2, module.py, manifest.json, spec.lock.yaml)."""
    from . import plan
    from .compiler import compile_plan
    from .emit import emit
    from .explain import stage_table
    from .models import load_model
    from .passes import PIPELINE

    steps = ["load model", "capture", *(p.__name__ for p in PIPELINE), "emit"]
    if quiet:
        _silence_progress_bars()
    try:
        start = time.perf_counter()
        the_plan = plan(spec)
        if "decode" in the_plan.lock:
            steps[-1:-1] = ["export_prefill", "export_decode"]
        target = out or Path(the_plan.spec.data.get("output", {}).get("dir", "build"))
        _check_writable(target)
        if not quiet:
            typer.echo(stage_table(the_plan))
        with _progress(len(steps), enabled=not quiet and sys.stderr.isatty()) as advance:
            advance("load model")
            model = load_model(the_plan.lock["model"], the_plan.spec.base_dir)
            compiled = compile_plan(the_plan, model, on_step=advance)
            advance("emit")
            path = emit(compiled, model, target)
    except PrunecError as exc:
        _fail(exc)
    if quiet:
        typer.echo(str(path))
        return
    timing = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in compiled.timings.items())
    nodes = len(compiled.program.graph_module.graph.nodes)
    typer.echo(f"passes: {timing}")
    typer.echo(f"verified: rewritten graph re-exported with dynamic shapes ({nodes} nodes)")
    typer.echo(f"wrote {path}/ in {time.perf_counter() - start:.1f}s")


def _check_writable(directory: Path) -> None:
    """Fail before minutes of compiling when the output directory cannot be created or written."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as exc:
        raise PrunecError(f"cannot write the artifact to {directory}: {exc.strerror or exc}") from None


def _silence_progress_bars() -> None:
    """--quiet: no loading bars from transformers or the hub (a library prints them to stderr)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A progress bar with step names and ETA on a terminal; silent otherwise (CI logs, --quiet)."""
    if not enabled:
        yield lambda name: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description:<20}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, console=__import__("rich.console").console.Console(stderr=True)) as bar:
        task = bar.add_task("start", total=total)
        started = []

        def advance(name: str) -> None:
            if started:
                bar.advance(task)
            started.append(name)
            bar.update(task, description=name)

        yield advance
        bar.update(task, completed=total)


@app.command()
def run(artifact: Path = typer.Argument(..., help="artifact directory written by build"),
        batch: Optional[int] = typer.Option(None, min=1, help="batch size (default: the spec's)"),
        seq_len: Optional[int] = typer.Option(None, min=1, help="sequence length (default: the spec's)"),
        seed: int = typer.Option(0, help="seed of the random example inputs")) -> None:
    """Run an artifact on seeded example inputs and print what came out."""
    import torch

    from . import load
    from .adapters import adapter_for
    from .adapters.base import ExampleShape
    from .artifact import read_manifest
    from .models import model_config

    try:
        if not (artifact / "manifest.json").is_file():
            raise PrunecError(f"{artifact} is not a prunec artifact (no manifest.json)")
        lock = __import__("yaml").safe_load((artifact / "spec.lock.yaml").read_text())
        adapter = adapter_for(model_config(lock["model"], artifact))
        inputs = lock["inputs"]
        if seq_len is not None:
            _check_axis(read_manifest(artifact), "seq", seq_len, "--seq-len")
        shape = ExampleShape(batch or inputs["batch"], seq_len or inputs.get("seq_len"), inputs.get("image_size"),
                             inputs.get("images", 1))
        example = adapter.example_inputs(shape, seed)
        module = load(artifact)
        with torch.no_grad():
            start = time.perf_counter()
            output = module(*example)
            seconds = time.perf_counter() - start
    except PrunecError as exc:
        _fail(exc)
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(adapter.input_names(), example))
    typer.echo(f"inputs: {shapes}")
    typer.echo(f"output: {tuple(output.shape)} {output.dtype}, finite: {bool(torch.isfinite(output).all())}, "
               f"mean {output.float().mean().item():.6f}")
    typer.echo(f"forward: {seconds * 1000:.1f} ms")


def _check_axis(manifest: dict, name: str, value: int, flag: str) -> None:
    """A requested size against the bounds the artifact was built for (its recorded signature)."""
    from .errors import PrunecInputError

    for axis in manifest.get("signature", {}).get("axes", {}).values():
        if axis["name"] == name and (value < axis["min"] or (axis["max"] is not None and value > axis["max"])):
            raise PrunecInputError(f"{flag} {value}: the artifact takes {name} in {axis['min']}..{axis['max']}")


@app.command()
def bench(spec: Path = typer.Argument(..., help="spec file"),
          rounds: int = typer.Option(10, min=1, help="timed rounds per way (A B C A B C ...)"),
          warmup: int = typer.Option(2, min=1, help="untimed rounds first"),
          threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: OMP_NUM_THREADS or torch's)"),
          eager: bool = typer.Option(True, "--eager/--no-eager", help="also time the eager-attention way"),
          new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="tokens generated per timing (specs with decode:)"),
          as_json: bool = typer.Option(False, "--json", help="print the report as JSON")) -> None:
    """Build the spec, then time unpruned vs emitted vs the eager-attention way, with FLOPs ideals."""
    import torch

    from .bench import bench_spec, format_report

    if threads:
        torch.set_num_threads(threads)
    try:
        report = bench_spec(spec, rounds=rounds, warmup=warmup, eager=eager, new_tokens=new_tokens)
    except PrunecError as exc:
        _fail(exc)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command()
def diff(a: Path = typer.Argument(..., help="spec or lock A"), b: Path = typer.Argument(..., help="spec or lock B")) -> None:
    """Semantic diff of two specs after extends and defaults. Exit 0 if equivalent, 1 if not."""
    from . import plan
    from .diff import consequences, differences

    try:
        plan_a, plan_b = plan(a), plan(b)
    except PrunecError as exc:
        _fail(exc)
    found = differences(plan_a, plan_b)
    for difference in found:
        typer.echo(str(difference))
    semantic = [d for d in found if d.semantic]
    if not semantic:
        typer.echo("equivalent: the two specs compile the same computation")
        raise typer.Exit(0)
    for line in consequences(plan_a, plan_b):
        typer.echo(line)
    raise typer.Exit(1)


@app.command()
def verify(artifact: Path = typer.Argument(..., help="artifact directory"),
           rebuild: bool = typer.Option(False, "--rebuild", help="also rebuild from the lock and compare bytes")) -> None:
    """Check an artifact against its manifest: hashes, versions, and optionally a rebuild.
    Exit 0 if it checks out (warnings allowed), 1 on a mismatch, 2 if it cannot be read."""
    from .verify import verify_artifact

    try:
        report = verify_artifact(artifact, rebuild=rebuild)
    except PrunecError as exc:
        _fail(exc)
    for line in report.lines():
        typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def viz(target: Path = typer.Argument(..., help="artifact directory, or a spec (built into a temporary directory)"),
        out: Path = typer.Option(..., "-o", "--out", help="output file"),
        image: Optional[Path] = typer.Option(None, help="image file (default: a built-in test card)"),
        fmt: Optional[str] = typer.Option(None, "--format", help="png or svg (default: the output's extension)"),
        seed: int = typer.Option(0, help="seed of the example text tokens")) -> None:
    """Draw a keep-map: the image per stage with kept patches outlined and dropped ones hatched,
    plus tokens per layer and the FLOPs share. PNG and SVG draw the same picture."""
    import tempfile

    from . import build as build_artifact
    from . import load, plan
    from .files import write_atomic
    from .viz import default_picture, kept_for, scene, to_png, to_svg, layout

    try:
        fmt = _image_format(out, fmt)
        picture = _read_image(image) if image else default_picture()
        with tempfile.TemporaryDirectory() as scratch:
            artifact = target if target.is_dir() else build_artifact(target, Path(scratch))
            the_plan = plan(artifact / "spec.lock.yaml")
            if not the_plan.adapter.needs_image:
                raise PrunecError(f"family {the_plan.adapter.family} has no image patches to draw")
            kept = kept_for(the_plan, load(artifact), picture, seed)
        drawing, size = scene(the_plan, picture, kept), layout(the_plan).size
        if fmt == "svg":
            data = to_svg(drawing, size)
        else:
            buffer = io.BytesIO()
            to_png(drawing, size).save(buffer, format="PNG", optimize=False)
            data = buffer.getvalue()
        try:
            write_atomic(out, data)
        except OSError as exc:
            raise PrunecError(f"cannot write {out}: {exc.strerror or exc}") from None
    except PrunecError as exc:
        _fail(exc)
    counts = ", ".join(f"{s.site} {len(k)}" for s, k in zip(the_plan.stages, kept))
    typer.echo(f"wrote {out} ({size[0]}x{size[1]}); patches kept: {counts}")


@app.command()
def generate(artifact: Path = typer.Argument(..., help="artifact directory built with `decode:`"),
             prompt: Optional[str] = typer.Option(None, help="text prompt (needs a tokenizer in the model directory)"),
             image: Optional[list[Path]] = typer.Option(
                 None, help="image for LLaVA prompts (needs the model's processor); repeat it to ask the same "
                            "prompt about several images in one batch, one answer line each (line breaks "
                            "inside an answer printed as \\n)"),
             input_ids: Optional[str] = typer.Option(None, "--input-ids", help="prompt as space-separated token ids"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
             sample: bool = typer.Option(False, "--sample/--greedy", help="sample instead of greedy decoding"),
             temperature: float = typer.Option(1.0, help="sampling temperature"),
             top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass"),
             seed: int = typer.Option(0, help="sampling seed, and the seed of example inputs"),
             raw: bool = typer.Option(False, "--raw", help="send --prompt as written (no chat template)"),
             ids: bool = typer.Option(False, "--ids", help="print token ids instead of text")) -> None:
    """Generate from an artifact: pruned prefill, then decoding against the per-layer pruned KV cache.
    Without --prompt or --input-ids, runs on seeded example inputs of the spec's shape."""
    from .generate import Generator, Sampling
    from .prompt import prompt_inputs

    try:
        for path in image or []:
            _read_image(path)  # before loading the model: a bad path fails at once
        generator = Generator(artifact)
        sampling = Sampling(do_sample=sample, temperature=temperature, top_p=top_p, seed=seed)
        inputs, tokenizer, note = prompt_inputs(generator, artifact, prompt, image or None, input_ids, seed, raw)
        tokens = generator.generate(*inputs, max_new_tokens=max_new_tokens, sampling=sampling)
    except (PrunecError, ValueError) as exc:
        _fail(exc if isinstance(exc, PrunecError) else PrunecError(str(exc)))
    if note:
        typer.echo(note)
    for row in tokens.tolist():
        if tokenizer is None or ids:
            typer.echo(" ".join(map(str, row)))
            continue
        text = tokenizer.decode(row, skip_special_tokens=True)
        # one line per row when there are several, so answers line up with the images given
        typer.echo(text if len(tokens) == 1 else text.strip().replace("\n", "\\n"))


def _image_format(out: Path, fmt: str | None) -> str:
    """The format --format names, else the output's extension; both must be png or svg and agree."""
    suffix = out.suffix.lower().lstrip(".")
    if fmt is not None and fmt not in ("png", "svg"):
        raise PrunecError(f"--format must be png or svg, not {fmt!r}")
    if suffix and suffix not in ("png", "svg"):
        raise PrunecError(f"{out}: keep-maps are written as .png or .svg, not .{suffix}")
    if fmt and suffix and fmt != suffix:
        raise PrunecError(f"--format {fmt} but {out} ends in .{suffix}; make them agree")
    return fmt or suffix or "png"


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(path)
        picture.load()
        return picture
    except (OSError, UnidentifiedImageError) as exc:
        raise PrunecError(f"cannot read image {path}: {exc}") from None


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="one method: its parameters in full"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every registered method (action, sites, signals, variants, rounding, source), or one in full."""
    from .methods import catalog, method_detail, method_names

    if name is not None:
        if name not in method_names():
            _fail(PrunecError(f"unknown method {name!r}; known: {', '.join(method_names())}"))
        detail = method_detail(name)
        if as_json:
            typer.echo(json.dumps(detail, indent=2))
            return
        typer.echo(f"{name}: {detail['action']}/{detail['kind']}, {detail['summary']}")
        for key in ("sites", "signals"):
            typer.echo(f"  {key}: {', '.join(detail[key])}")
        typer.echo(f"  positions: {detail['positions']} (default)")
        typer.echo(f"  rounding: {detail['rounding']}" + (f" ({detail['rounding_source']})"
                                                          if detail["rounding_source"] else ""))
        typer.echo(f"  run-time budgets: {'yes' if detail['row_budgets'] else 'no'} (rows of different candidate "
                   "counts, inputs.images_per_row)")
        typer.echo(f"  scope: {' | '.join(detail['scopes'])} (several images per row: over all, or within each)")
        typer.echo("  params:" + ("" if detail["params_detail"] else " none"))
        for param in detail["params_detail"]:
            default = "required" if param["required"] else (
                f"default {json.dumps(param['default'])}" if "default" in param else "optional")
            typer.echo(f"    {param['name']}: {param['type']}, {default}"
                       + (f". {param['description']}" if param["description"] else ""))
        for key, text in detail["variants"].items():
            typer.echo(f"  variant {key}: {text}")
        typer.echo(f"  official code: {detail['source'] or '-'}")
        typer.echo(f"  presets: {', '.join(detail['presets']) or '-'}")
        return
    rows = catalog()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["method"]) for row in rows)
    for row in rows:
        variants = "; ".join(f"{k}: {v}" for k, v in row["variants"].items()) or "-"
        typer.echo(f"{row['method']:<{width}} {row['action']}/{row['kind']:<6}  {row['summary']}")
        typer.echo(f"{'':<{width}} sites: {', '.join(row['sites'])}   signals: {', '.join(row['signals'])}   "
                   f"positions: {row['positions']}   fusable: {'yes' if row['fusable'] else 'no'}   "
                   f"rounding: {row['rounding']}   run-time budgets: {'yes' if row['row_budgets'] else 'no'}   "
                   f"scope: {'|'.join(row['scopes'])}")
        typer.echo(f"{'':<{width}} params: {', '.join(row['params']) or '-'}   variants: {variants}")
        typer.echo(f"{'':<{width}} source: {row['source']}")


def _task_names() -> list[str]:
    """The eval tasks, one module each in prunec/evals/ (named like the task), listed without
    importing them: `--help` stays fast. tests/test_cli.py checks this equals the task registry."""
    import importlib.util
    import pkgutil

    folder = importlib.util.find_spec(f"{__package__}.evals").submodule_search_locations
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(folder) if not m.name.startswith("_"))


@app.command("eval")
def eval_(spec: Path = typer.Argument(..., help="spec file (its pipeline is applied to the task's zoo model)"),
          task: str = typer.Option(..., "--task", help=" | ".join(_task_names())),
          limit: Optional[int] = typer.Option(500, min=1, help="held-out examples (default 500)"),
          keep: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                               help="rescale the budgets so the last stage keeps this share"),
          batch_size: int = typer.Option(16, min=1, help="examples per forward"),
          threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: OMP_NUM_THREADS or torch's)"),
          rebuild: bool = typer.Option(False, "--rebuild", help="build again even if this spec's build is cached"),
          as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Run the unpruned and the pruned model on a held-out task and print a paper-style table. The
    pruned build is cached under the zoo cache and reused while the spec, model and prunec match."""
    import torch

    from .evals import evaluate, table

    if threads:
        torch.set_num_threads(threads)
    try:
        result = evaluate(spec, task, limit=limit, keep=keep, batch_size=batch_size, rebuild=rebuild,
                          note=lambda message: typer.echo(message, err=True))
    except (PrunecError, ModuleNotFoundError) as exc:
        _fail(exc if isinstance(exc, PrunecError) else PrunecError(str(exc)))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    typer.echo(table([result]))
    others = {k: (result.metrics_unpruned[k], v) for k, v in result.metrics_pruned.items()}
    typer.echo("all metrics (unpruned -> pruned): " + ", ".join(f"{k} {a:.4g} -> {b:.4g}" for k, (a, b) in others.items()))
    build = (f"build {result.seconds['build_s']}s" if "build_s" in result.seconds
             else f"cached build loaded in {result.seconds['load_cached_build_s']}s")
    typer.echo(f"{result.examples} examples; {build}, unpruned {result.seconds['unpruned_s']}s, "
               f"pruned {result.seconds['pruned_s']}s, {torch.get_num_threads()} threads")


zoo_app = typer.Typer(no_args_is_help=True, help="the offline model zoo: real trained models rebuilt from installed packages")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Every zoo model: whether it is prepared, where, and the packages it is rebuilt from."""
    import importlib.util

    from . import zoo

    rows = []
    for name, entry in zoo.entries().items():
        missing = [p for p in entry.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
        rows.append({"name": name, "prepared": zoo.is_prepared(name), "path": str(zoo.path(name)),
                     "packages": list(entry.packages), "missing_packages": missing,
                     "description": entry.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "prepared" if row["prepared"] else (f"missing {', '.join(row['missing_packages'])}"
                                                   if row["missing_packages"] else "not prepared")
        typer.echo(f"{row['name']:<14} {state:<14} {row['description']}")
    typer.echo(f"cache: {zoo.cache_dir()}")


@zoo_app.command("prepare")
def zoo_prepare(names: list[str] = typer.Argument(..., help="zoo models to build (see `prunec zoo list`)")) -> None:
    """Build zoo models into the cache (once; a second call returns at once)."""
    from . import zoo

    for name in names:  # every name checked before anything is built
        try:
            zoo.entry(name)
        except KeyError as exc:
            _fail(PrunecError(str(exc).strip('"')))
    for name in names:
        if zoo.is_prepared(name):
            typer.echo(f"{name}: already prepared at {zoo.path(name)}")
            continue
        start = time.perf_counter()
        try:
            target = zoo.prepare(name, lambda message, n=name: typer.echo(f"{n}: {message}", err=True))
        except ModuleNotFoundError as exc:
            _fail(PrunecError(str(exc)))
        typer.echo(f"{name}: prepared at {target} in {time.perf_counter() - start:.1f}s")


@app.command()
def schema(out: Optional[Path] = typer.Option(None, "-o", "--out", help="write to this file instead of stdout")) -> None:
    """Print (or write) the spec's JSON Schema (Draft 2020-12), e.g. for editors."""
    from .schema import spec_schema

    text = json.dumps(spec_schema(), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        write_atomic(out, text)
    except OSError as exc:
        _fail(PrunecError(f"cannot write {out}: {exc.strerror or exc}"))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:  # a file or directory the user named cannot be read or written
        where = f" {exc.filename}" if exc.filename else ""
        typer.echo(f"error: cannot use{where}: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
