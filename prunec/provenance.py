"""Which code an artifact runs, so it runs as built or not at all.

An emitted program calls `prunec::` ops, and some of them call a registered method's function by
name when the model runs. The program itself cannot carry Python code, so the manifest records a
content hash of the code each stage runs: per method, the source of the file that registers it and
of every file of the method library it imports (transitively); for all of them, the runtime core
(ops, candidate bookkeeping, attention rows, kernels). `prunec.load` refuses an artifact whose
recorded hashes differ from the installed prunec's, in one line naming the method; `prunec verify`
reports the same and exits 1. Rebuilding from the artifact's `spec.lock.yaml` records the new code.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
from pathlib import Path

from .errors import PrunecError

# modules whose code runs inside every emitted program
RUNTIME_MODULES = ("prunec.ops", "prunec.candidates", "prunec.ragged", "prunec.anyres", "prunec.attention", "prunec.kernels")


class CodeChangedError(PrunecError):
    """The installed prunec runs different code than the artifact was built with."""


def _files(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin)
    if origin.name == "__init__.py":
        return sorted(origin.parent.glob("*.py"))
    return [origin]


def _library_imports(path: Path) -> set[str]:
    """Modules of prunec.methods that `path` imports with a relative import."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(f"prunec.methods.{node.module}")
    return out


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(paths), key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def method_code_hash(name: str) -> str:
    """sha256 over the method's registering file and the method-library files it imports."""
    from .methods import get_method

    info = get_method(name)
    start = Path(inspect.getsourcefile(info.fn))
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _library_imports(path):
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.origin:
                todo.append(Path(spec.origin))
    return _digest(seen)


def runtime_code_hash() -> str:
    return _digest(path for module in RUNTIME_MODULES for path in _files(module))


def stage_methods(plan) -> list[str]:
    """Every method a plan's stages run (a fusion's terms included)."""
    from .methods import terms

    return sorted({m for stage in plan.stages for m in [stage.method] + [t for t, _, _ in
                                                                        terms(stage.method, stage.param_dict)]})


def code_record(plan) -> dict:
    """What the manifest records under `code`."""
    return {"runtime_sha256": runtime_code_hash(),
            "methods_sha256": {name: method_code_hash(name) for name in stage_methods(plan)}}


def code_changes(record: dict) -> list[str]:
    """One line per difference between a recorded `code` entry and the installed prunec; empty if none."""
    from .methods import method_names

    if not record:
        return ["the manifest records no code hashes (built by a prunec before they were recorded)"]
    out = []
    for name, built in sorted(record.get("methods_sha256", {}).items()):
        if name not in method_names():
            out.append(f"method {name} is not registered in the installed prunec")
        elif method_code_hash(name) != built:
            out.append(f"method {name}'s code changed since the build (sha256 {built[:12]} -> "
                       f"{method_code_hash(name)[:12]})")
    if record.get("runtime_sha256") != runtime_code_hash():
        out.append("prunec's runtime ops changed since the build (sha256 "
                   f"{str(record.get('runtime_sha256'))[:12]} -> {runtime_code_hash()[:12]})")
    return out


def check_code(artifact: Path, manifest: dict) -> None:
    changes = code_changes(manifest.get("code", {}))
    if changes:
        raise CodeChangedError(f"{artifact}: {changes[0]}; it would not compute what it was built to. Rebuild it: "
                               f"prunec build {artifact / 'spec.lock.yaml'}")
