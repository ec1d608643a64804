"""Artifacts: reproducible bytes, atomic writes, and what a build leaves behind when it fails."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prunec
from conftest import REPO, write_spec
from prunec import compiler
from prunec.errors import BuildError

SPEC = """
    prunec: 1
    name: artifact-test
    model: {builtin: tiny-llava}
    inputs: {batch: 2, seq_len: 30}
    pipeline:
      - {site: projector.output, method: divprune, keep: {ratio: 0.5}}
      - {site: "llm.layers[1]", method: fastv, keep: {ratio: 0.25}}
"""
REPRODUCIBLE = ("manifest.json", "spec.lock.yaml", "module.py")


def _entries(directory: Path) -> list[str]:
    """What a build left in its output directory, apart from the (empty) lock file it swaps under."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "prunec.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, **kwargs)


def test_two_builds_are_byte_identical(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    for out in ("a", "b"):  # separate processes: nothing shared in memory
        proc = _cli("build", spec, "-o", tmp_path / out)
        assert proc.returncode == 0, proc.stderr
    for name in REPRODUCIBLE:
        first = (tmp_path / "a" / "artifact-test" / name).read_bytes()
        assert first == (tmp_path / "b" / "artifact-test" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "a" / "artifact-test" / "manifest.json").read_text())
    assert manifest["stages"][0]["candidates_kept"] == 8 and manifest["stages"][1]["candidates_kept"] == 4
    assert set(manifest["versions"]) == {"python", "torch", "transformers", "triton", "prunec"}


def test_lock_is_a_spec_that_rebuilds_the_same_plan(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    artifact = prunec.build(spec, tmp_path / "out")
    relocked = prunec.plan(artifact / "spec.lock.yaml")
    assert relocked.stages == prunec.plan(spec).stages
    assert relocked.spec_hash == json.loads((artifact / "manifest.json").read_text())["spec_sha256"]


def _failing_pass(gm, ctx):
    raise RuntimeError("injected failure in a late pass")


def test_failed_late_pass_leaves_no_artifact_and_keeps_the_old_one(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, SPEC)
    out = tmp_path / "out"
    good = prunec.build(spec, out)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    monkeypatch.setattr(compiler, "PIPELINE", compiler.PIPELINE[:-1] + (_failing_pass,))
    with pytest.raises(BuildError, match="pass _failing_pass .*injected failure"):
        prunec.build(spec, out)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert _entries(out) == ["artifact-test"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, SPEC)
    out = tmp_path / "out"

    def broken_save(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("torch.export.save", broken_save)
    with pytest.raises(OSError, match="injected"):
        prunec.build(spec, out)
    assert _entries(out) == []


def test_killed_build_leaves_no_partial_artifact(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "prunec.cli", "build", str(spec), "-o", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not any(out.glob(".artifact-test~staging-*")) and proc.poll() is None:
        time.sleep(0.002)  # wait until the artifact is being written, then kill it there
    staging_seen = any(out.glob(".artifact-test~staging-*"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staging_seen and proc.returncode == -signal.SIGKILL, "the build was not caught mid-write"
    assert not (out / "artifact-test").exists()
    prunec.build(spec, out)  # the next build cleans the staging directory the killed one left
    assert _entries(out) == ["artifact-test"]
