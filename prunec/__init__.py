"""prunec: a declarative token-pruning compiler for transformer models.

    import prunec
    artifact = prunec.build("examples/quickstart.yaml", out_dir="build")
    module = prunec.load(artifact)          # a torch.nn.Module (the rewritten exported program)
"""
from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402

from .errors import BuildError, PrunecError, SpecError  # noqa: E402


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


def load(path: str | Path):
    """Load an artifact directory (or its model.pt2) as a runnable torch.nn.Module. Nothing in the
    artifact is unpickled, and a directory's program must match its manifest digest."""
    from .artifact import load_module

    return load_module(path)


def load_generator(path: str | Path):
    """An artifact built with `decode:` as a `Generator`: `.generate(*inputs, max_new_tokens=...)`."""
    from .generate import Generator

    return Generator(path)


__all__ = ["BuildError", "PrunecError", "SpecError", "build", "load", "load_generator", "load_spec", "plan", "__version__"]
