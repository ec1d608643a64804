"""Write a compiled program as an artifact directory, atomically.

`DIR/<name>/` holds model.pt2 (torch.export.save), module.py (the rewritten graph as code),
manifest.json and spec.lock.yaml. Everything is written into a hidden sibling directory first and
renamed into place only when complete, so a failed or killed build never leaves a partial
`DIR/<name>/`, and a rebuild replaces the old artifact in one step.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .compiler import Compiled
from .flops import estimate
from .models import model_identity
from .spec import dump_lock

MANIFEST_VERSION = 1


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "prunec": __version__,
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(compiled: Compiled, model: torch.nn.Module, module_code: str, lock_text: str) -> dict:
    plan = compiled.plan
    graph = compiled.program.graph_module.graph
    ops = Counter(str(n.target) for n in graph.nodes if str(n.target).startswith("prunec."))
    records = {r.stage.site: r for r in compiled.context.records}
    inputs = plan.lock["inputs"]
    stages = []
    tokens = {name: plan.adapter.tokens_at_input(name, inputs) for name in plan.adapter.domains()}
    for stage in plan.stages:
        dropped = stage.n_candidates - stage.n_keep
        stages.append({
            "site": stage.site,
            "method": stage.method,
            "action": stage.action,
            "params": stage.param_dict,
            "positions": stage.positions,
            "protect": list(stage.protect),
            "candidates_in": stage.n_candidates,
            "candidates_kept": stage.n_keep,
            "tokens_in": tokens[stage.domain],
            "tokens_out": tokens[stage.domain] - dropped,
            "carried": records[stage.site].propagated,
        })
        tokens[stage.domain] -= dropped
    return {
        "prunec_manifest": MANIFEST_VERSION,
        "name": plan.spec.name,
        "spec_sha256": plan.spec_hash,
        "model": {
            "family": plan.adapter.family,
            "model_type": plan.adapter.config.model_type,
            "identity_sha256": model_identity(model),
        },
        "inputs": {"names": list(plan.adapter.input_names()), **inputs},
        "versions": versions(),
        "stages": stages,
        "flops": estimate(plan),
        "graph": {"nodes": len(graph.nodes), "prunec_ops": dict(sorted(ops.items()))},
        "files": {"module.py": _sha256(module_code.encode()), "spec.lock.yaml": _sha256(lock_text.encode())},
    }


def emit(compiled: Compiled, model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the artifact to `out_dir/<name>/` and return that path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = compiled.plan.spec.name
    final = out_dir / name
    for stale in out_dir.glob(f".{name}.tmp-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    staging.chmod(0o755)
    try:
        module_code = compiled.program.module().code.strip() + "\n"
        lock_text = dump_lock(compiled.plan.lock)
        torch.export.save(compiled.program, staging / "model.pt2")
        (staging / "module.py").write_text(module_code)
        (staging / "spec.lock.yaml").write_text(lock_text)
        data = manifest(compiled, model, module_code, lock_text)
        (staging / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _swap_into_place(staging: Path, final: Path) -> None:
    if not final.exists():
        os.replace(staging, final)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-old-", dir=final.parent))
    os.replace(final, retired / final.name)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)
