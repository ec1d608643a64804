"""Write a compiled program as an artifact directory, atomically.

`DIR/<name>/` holds model.pt2 (torch.export.save), module.py (the rewritten graph as code),
manifest.json and spec.lock.yaml; with `decode:` in the spec, also prefill.pt2 and decode.pt2
(generation programs, see decode.py). The programs carry no weight bytes: those are stored once in
weights.safetensors (see weights.py). Everything is written into a hidden sibling directory first and
renamed into place only when complete, so a failed or killed build never leaves a partial
`DIR/<name>/`, and a rebuild replaces the old artifact in one step.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import platform
import shutil
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .artifact import program_digest
from .compiler import Compiled
from .errors import BuildError
from .files import file_sha256
from .flops import estimate
from .models import model_identity
from .provenance import code_record
from .ragged import RowBudget
from .schedule import stage_tokens
from .semantics import PROVIDED_CONFIG, dump_lock
from .signature import compiled_signature
from .weights import WEIGHTS_FILE, detached

MANIFEST_VERSION = 2  # 2: weights in weights.safetensors, bound through `weights.programs`


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


def manifest(compiled: Compiled, model: torch.nn.Module, module_code: str, lock_text: str,
             digests: dict[str, str]) -> dict:
    plan = compiled.plan
    graph = compiled.program.graph_module.graph
    ops = Counter(str(n.target) for n in graph.nodes if str(n.target).startswith("prunec."))
    records = {r.stage.site: r for r in compiled.context.records}
    inputs = plan.lock["inputs"]
    stages = []
    for t in stage_tokens(plan):
        stage = t.stage
        stages.append({
            "site": stage.site,
            "method": stage.method,
            "action": stage.action,
            "params": stage.param_dict,
            "positions": stage.positions,
            "protect": list(stage.protect),
            "rounding": stage.rounding,
            "scope": stage.scope,
            "candidates_in": t.candidates_in,
            "candidates_kept": t.candidates_kept,
            "tokens_in": t.tokens_in,
            "tokens_out": t.tokens_out,
            "carried": records[stage.site].propagated,
        })
        if stage.ragged:  # the counts above hold at the example inputs; each row keeps by this formula
            stages[-1]["budget"] = {"resolved": "per row, at run time", "formula": RowBudget.of_stage(stage).formula(),
                                    "of": stage.keep_of}
    data = {
        "prunec_manifest": MANIFEST_VERSION,
        "name": plan.spec.name,
        "spec_sha256": plan.spec_hash,
        "model": {
            "family": plan.adapter.family,
            "model_type": plan.adapter.config.model_type,
            "identity_sha256": model_identity(model),
        },
        "inputs": {"names": list(plan.adapter.input_names()), **inputs},
        "signature": compiled_signature(compiled),
        "versions": versions(),
        "stages": stages,
        "flops": estimate(plan),
        "graph": {"nodes": len(graph.nodes), "prunec_ops": dict(sorted(ops.items()))},
        "passes": compiled.context.pass_reports,
        "code": code_record(plan),
        "files": {**digests, "module.py": _sha256(module_code.encode()),
                  "spec.lock.yaml": _sha256(lock_text.encode())},
    }
    if compiled.generation:
        data["decode"] = decode_manifest(plan)
    return data


def decode_manifest(plan) -> dict:
    from .decode import cache_lengths, kv_cache_bytes
    from .schedule import position_layer, position_offset

    lengths = cache_lengths(plan)
    full = [plan.adapter.tokens_at_input("llm", plan.lock["inputs"])] * len(lengths)
    return {
        "policy": plan.lock["decode"]["policy"],
        "position_offset": position_offset(plan),
        "position_from_layer": position_layer(plan),
        "cache_lengths": lengths,
        "kv_cache_bytes_per_row": {"unpruned": kv_cache_bytes(plan, full), "pruned": kv_cache_bytes(plan, lengths)},
        "note": "cache lengths and bytes at the spec's example inputs; each layer holds seq_len minus the "
                "tokens dropped before it, plus one entry per generated token",
    }


# What a processor or tokenizer is made of in a from_pretrained directory: the artifact carries these
# so `prunec.load_processor(ART)` needs nothing but the artifact.
PREPROCESSING_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                       "chat_template.json", "chat_template.jinja", "generation_config.json")


def copy_preprocessing(plan, target: Path) -> dict:
    """Copy the model directory's processor/tokenizer files into the artifact; describe them."""
    from .models import pretrained_dir

    source = pretrained_dir(plan.lock["model"], plan.spec.base_dir)
    files = [name for name in PREPROCESSING_FILES if source is not None and (source / name).is_file()]
    for name in files:
        shutil.copyfile(source / name, target / name)
    config = plan.adapter.config
    image_token = getattr(config, "image_token_id", None)
    return {"files": files, "image_token_id": image_token,
            "chat_template": any(n.startswith("chat_template") for n in files) or _has_template(target)}


def _has_template(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def emit(compiled: Compiled, model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the artifact to `out_dir/<name>/` and return that path. A plan compiled from a model
    object (`prunec.compile`) also gets that model's config, which its lock names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = compiled.plan.spec.name
    final = out_dir / name
    _remove_abandoned_staging(out_dir, name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}~staging-{os.getpid()}-", dir=out_dir))
    staging.chmod(0o755)
    try:
        module_code = compiled.program.module().code.strip() + "\n"
        lock_text = dump_lock(compiled.plan.lock)
        programs = {"model.pt2": compiled.program, **{f"{n}.pt2": p for n, p in compiled.generation.items()}}
        digests = {}
        with detached(programs) as shared:
            for file, program in programs.items():
                for node in program.graph.nodes:
                    node.meta.pop("from_node", None)  # provenance holding memory addresses: not reproducible
                program.example_inputs = None  # torch saves them pickled; loading must never need pickle
                torch.export.save(program, staging / file)
                digests[file] = program_digest(staging / file)
        shared.save(staging / WEIGHTS_FILE)
        digests[WEIGHTS_FILE] = file_sha256(staging / WEIGHTS_FILE)
        (staging / "module.py").write_text(module_code)
        (staging / "spec.lock.yaml").write_text(lock_text)
        if compiled.plan.lock["model"].get("config") == PROVIDED_CONFIG:
            (staging / PROVIDED_CONFIG).write_text(model.config.to_json_string())
        preprocessing = copy_preprocessing(compiled.plan, staging)
        data = manifest(compiled, model, module_code, lock_text, digests)
        data["weights"] = {"file": WEIGHTS_FILE, "tensors": len(shared.tensors), "programs": shared.bindings}
        data["preprocessing"] = preprocessing
        data["files"].update({name: _sha256((staging / name).read_bytes()) for name in preprocessing["files"]})
        (staging / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_staging(out_dir: Path, name: str) -> None:
    """Delete staging directories left by killed builds of this name, never those of a build still
    running. '~' cannot occur in a name, so another name's directories never match."""
    pattern = re.compile(rf"^\.{re.escape(name)}~(?:staging|retired)-(\d+)-[^/]*$")
    for stale in out_dir.glob(f".{name}~*"):
        match = pattern.match(stale.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_into_place(staging: Path, final: Path) -> None:
    """Put the finished staging directory at `final` under a lock, so racing builds of one name
    replace each other whole. An existing artifact is exchanged in one step where the OS allows it
    (no moment without an artifact); a symlink at `final` is replaced, never followed."""
    lock_path = final.parent / f".{final.name}.lock"
    try:
        lock_fd = os.open(lock_path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise BuildError(f"cannot open the build lock {lock_path} (a symlink is refused): {exc.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not os.path.lexists(final):
            os.replace(staging, final)
            return
        if _exchange(staging, final):  # staging now holds the old artifact
            _remove(staging)
            return
        retired = Path(tempfile.mkdtemp(prefix=f".{final.name}~retired-{os.getpid()}-", dir=final.parent))
        os.replace(final, retired / final.name)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        os.close(lock_fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
