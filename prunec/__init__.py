"""prunec: a declarative token-pruning compiler for transformer models.

    import prunec
    artifact = prunec.build("examples/quickstart.yaml", out_dir="build")
    module = prunec.load(artifact)          # a torch.nn.Module (the rewritten exported program)
"""
from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402

from .errors import BuildError, PrunecError, PrunecInputError, SpecError  # noqa: E402


def load_spec(path):
    """Load and validate a spec file (YAML, schema, `extends`). Raises SpecError."""
    from .spec import load_spec as _load

    return _load(path)


def plan(path):
    """Load a spec and check it against its model: a Plan with budgets resolved to counts."""
    from .spec import load_spec as _load
    from .semantics import resolve

    return resolve(_load(path))


def build(spec_path, out_dir: str | Path | None = None) -> Path:
    """Compile a spec and write its artifact directory; returns `out_dir/<name>`."""
    from .compiler import compile_plan
    from .emit import emit
    from .models import load_model

    the_plan = plan(spec_path)
    model = load_model(the_plan.lock["model"], the_plan.spec.base_dir)
    compiled = compile_plan(the_plan, model)
    target = out_dir or the_plan.spec.data.get("output", {}).get("dir", "build")
    return emit(compiled, model, target)


def compile(model, spec, out_dir: str | Path | None = None):
    """Prune an already loaded Hugging Face model: `spec` is a spec file's path, its YAML text or a
    dict; its `model:` entry (if any) is replaced by `model`. Runs the same validation and passes as
    `build` and returns the pruned module (inputs checked like `load`'s). With `out_dir`, also
    writes the artifact there (its lock carries the model's config) and returns it loaded."""
    from .compiler import compile_plan
    from .emit import emit
    from .semantics import resolve
    from .signature import compiled_signature, runnable
    from .spec import load_spec_source

    the_plan = resolve(load_spec_source(spec, model_given=True), model=model)
    model.eval()
    compiled = compile_plan(the_plan, model)
    if out_dir is not None:
        return load(emit(compiled, model, out_dir))
    return runnable(compiled.program.module(), the_plan.lock.get("backend", "auto"), compiled_signature(compiled))


def load(path: str | Path):
    """Load an artifact directory (or its model.pt2) as a runnable torch.nn.Module. Nothing in the
    artifact is unpickled, and a directory's program must match its manifest digest."""
    from .artifact import load_module

    return load_module(path)


def load_processor(path: str | Path):
    """The Hugging Face processor (or tokenizer, for text models) the artifact ships, from the model
    directory it was built from; PrunecError when the model had none (built from a config)."""
    from .preprocessing import load_processor as _load

    return _load(Path(path))


def load_generator(path: str | Path):
    """An artifact built with `decode:` as a `Generator`: `.generate(*inputs, max_new_tokens=...)`."""
    from .generate import Generator

    return Generator(path)


__all__ = ["BuildError", "PrunecError", "PrunecInputError", "SpecError", "build", "compile", "load", "load_generator", "load_processor", "load_spec", "plan", "__version__"]
