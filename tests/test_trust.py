"""Sharing and trusting artifacts: semantic diff, verify, tamper and corruption refusal, hostile
paths and racing builds."""
from __future__ import annotations

import json
import re
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import prunec
from conftest import REPO, write_spec
from prunec.artifact import ArtifactError
from prunec.cli import app

SPEC = """
    prunec: 1
    name: trust
    model: {builtin: tiny-llava}
    inputs: {batch: 2, seq_len: 30}
    pipeline:
      - {site: "llm.layers[1]", method: fastv, keep: {ratio: 0.5}}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return prunec.build(write_spec(root, SPEC), root / "out")


def _copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy" / artifact.name
    shutil.copytree(artifact, target)
    return target


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------- diff

def test_diff_of_a_spec_and_its_lock_is_equivalent(artifact):
    result = _cli("diff", REPO / "specs" / "fastv.yaml", REPO / "specs" / "fastv.yaml")
    assert result.exit_code == 0 and "equivalent" in result.output
    relocked = _cli("diff", artifact / "spec.lock.yaml", artifact / "spec.lock.yaml")
    assert relocked.exit_code == 0


def test_diff_ignores_formatting_and_inherited_values(tmp_path):
    a = write_spec(tmp_path, SPEC, "a.yaml")
    b = write_spec(tmp_path, """
        # same strategy: flow style swapped for block style, defaults written out, via extends
        prunec: 1
        extends: a.yaml
        name: trust
        pipeline:
          - site: llm.layers[1]
            method: fastv
            params: {query: last}
            positions: keep_original
            keep: {count: 8}
    """, "b.yaml")
    result = _cli("diff", a, b)
    assert result.exit_code == 0, result.output


def test_diff_reports_what_changed_and_its_cost(tmp_path):
    a = write_spec(tmp_path, SPEC, "a.yaml")
    b = write_spec(tmp_path, SPEC.replace("ratio: 0.5", "ratio: 0.25").replace("layers[1]", "layers[2]"), "b.yaml")
    result = _cli("diff", a, b)
    assert result.exit_code == 1
    assert "stage llm.layers[1]: fastv, keep 8/16 -> absent" in result.output
    assert "stage llm.layers[2]: absent -> fastv, keep 4/16" in result.output
    assert "A: llm ends with 22 tokens" in result.output and "B: llm ends with 18 tokens" in result.output


# --------------------------------------------------------------------------------- verify

def test_verify_accepts_a_fresh_artifact_and_its_rebuild(artifact):
    result = _cli("verify", artifact, "--rebuild")
    assert result.exit_code == 0, result.output
    assert "ok   rebuild: manifest.json bytes" in result.output and "verified" in result.output


@pytest.mark.parametrize("victim", ["module.py", "spec.lock.yaml"])
def test_verify_catches_an_edited_file(artifact, tmp_path, victim):
    copy = _copy(artifact, tmp_path)
    with open(copy / victim, "a") as handle:
        handle.write("\n# edited\n")
    result = _cli("verify", copy)
    assert result.exit_code == 1 and f"FAIL {victim} sha256" in result.output


def test_verify_warns_on_version_mismatch_and_refuses_unknown_format(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["versions"]["torch"] = "2.12.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = _cli("verify", copy)
    assert result.exit_code == 0 and "warn built with torch 2.12.0" in result.output
    manifest["prunec_manifest"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = _cli("verify", copy)
    assert result.exit_code == 2 and "manifest format 99" in result.output


@pytest.mark.parametrize("damage,message", [
    ("truncate-program", "not a readable .pt2 archive"),
    ("garbage-manifest", "is not valid JSON"),
    ("missing-manifest", "is not a prunec artifact"),
    ("flipped-weight-byte", "does not match the digest"),
    ("flipped-program-byte", "does not match the digest"),
])
def test_corrupted_artifacts_give_one_line_errors(artifact, tmp_path, damage, message):
    copy = _copy(artifact, tmp_path)
    program = copy / "model.pt2"
    if damage == "truncate-program":
        program.write_bytes(program.read_bytes()[: program.stat().st_size // 2])
    elif damage == "garbage-manifest":
        (copy / "manifest.json").write_text("{not json")
    elif damage == "missing-manifest":
        (copy / "manifest.json").unlink()
    elif damage == "flipped-weight-byte":
        weights = copy / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-5] ^= 1
        weights.write_bytes(bytes(data))
    else:
        _rewrite_zip(program, lambda name, data: data.replace(b'"dtype": 7', b'"dtype": 6', 1)
                     if name.endswith("model_weights_config.json") else data)
    result = _cli("run", copy)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    checked = _cli("verify", copy)
    if damage == "flipped-weight-byte":  # readable but not what the manifest says
        assert checked.exit_code == 1 and "FAIL weights.safetensors sha256" in checked.output
    elif damage == "flipped-program-byte":
        assert checked.exit_code == 1 and "FAIL model.pt2 content digest" in checked.output
    else:
        assert checked.exit_code == 2 and message in checked.output and "Traceback" not in checked.output


# ------------------------------------------------------------------------------- tampering

class _Touch:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _rewrite_zip(path: Path, edit) -> None:
    with zipfile.ZipFile(path) as src:
        entries = [(info, edit(info.filename, src.read(info.filename))) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in entries:
            if data is not None:
                dst.writestr(info.filename, data)


def _plant_sample_inputs(program: Path, marker: Path) -> None:
    payload = pickle.dumps(_Touch(marker))
    _rewrite_zip(program, lambda name, data: payload if name.endswith("data/sample_inputs/model.pt") else data)


def _plant_pickled_weight(program: Path, marker: Path) -> None:
    def edit(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return pickle.dumps(_Touch(marker))
        return data
    _rewrite_zip(program, edit)


def test_pickle_payload_in_sample_inputs_would_run_in_plain_torch(artifact, tmp_path):
    """The threat is real: torch.export.load itself executes this payload (in a child process)."""
    copy = _copy(artifact, tmp_path)
    marker = tmp_path / "pwned-by-torch"
    _plant_sample_inputs(copy / "model.pt2", marker)
    code = ("import sys; sys.path.insert(0, %r); import prunec.ops, torch\n"
            "try:\n    torch.export.load(%r)\nexcept Exception:\n    pass\n") % (str(REPO / "tests"), str(copy / "model.pt2"))
    subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path)
    assert marker.exists()


@pytest.mark.parametrize("plant", [_plant_sample_inputs, _plant_pickled_weight], ids=["sample-inputs", "weight"])
@pytest.mark.parametrize("target", ["directory", "bare-pt2"])
def test_prunec_refuses_pickle_payloads(artifact, tmp_path, plant, target):
    copy = _copy(artifact, tmp_path)
    marker = tmp_path / "pwned"
    plant(copy / "model.pt2", marker)
    with pytest.raises(ArtifactError, match="pickle"):
        prunec.load(copy if target == "directory" else copy / "model.pt2")
    assert not marker.exists()


def test_unexpected_archive_entry_is_refused(artifact, tmp_path):
    copy = _copy(artifact, tmp_path)
    with zipfile.ZipFile(copy / "model.pt2", "a") as archive:
        archive.writestr("model/extra/payload.pkl", pickle.dumps(_Touch(tmp_path / "x")))
    with pytest.raises(ArtifactError, match="unexpected entry"):
        prunec.load(copy / "model.pt2")


# --------------------------------------------------------------------------- hostile paths

@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/../../b", ".hidden", "x" * 200])
def test_names_cannot_leave_the_output_directory(tmp_path, name):
    spec = write_spec(tmp_path, SPEC.replace("name: trust", f"name: {json.dumps(name)}"))
    result = _cli("validate", spec)
    assert result.exit_code == 2 and "/name" in result.output


def test_symlink_at_the_artifact_path_is_replaced_not_followed(tmp_path, artifact):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    out = tmp_path / "out"
    out.mkdir()
    (out / "trust").symlink_to(outside, target_is_directory=True)
    built = prunec.build(write_spec(tmp_path, SPEC), out)
    assert not built.is_symlink() and (built / "manifest.json").is_file()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_racing_builds_into_one_directory_leave_one_whole_artifact(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "prunec.cli", "build", str(spec), "-o", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".lock")) == ["trust"]
    assert _cli("verify", out / "trust").exit_code == 0


@pytest.mark.parametrize("config,message", [
    ("{not json", "cannot use this model"),
    ('{"model_type": "no-such-model"}', "cannot use this model"),
])
def test_broken_model_directory_gives_a_one_line_error(tmp_path, config, message):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text(config)
    spec = write_spec(tmp_path, SPEC.replace("{builtin: tiny-llava}", "{path: weights}"))
    result = _cli("validate", spec)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert re.search(r"spec\.yaml:3:\d+: error at /model", result.output)


def test_duplicate_entry_names_are_refused(artifact, tmp_path):
    """zipfile reads the last of two same-named entries and torch's reader the first, so a clean
    config placed after a malicious one would pass a check that torch then ignores."""
    copy = _copy(artifact, tmp_path)
    marker = tmp_path / "pwned"
    program = copy / "model.pt2"
    with zipfile.ZipFile(program) as src:
        entries = [(info.filename, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(program, "w") as dst:
        for name, data in entries:
            if name.endswith("model_weights_config.json"):
                evil = json.loads(data)
                first = next(iter(evil["config"].values()))
                first.update(use_pickle=True, path_name="weight_999")
                dst.writestr(name, json.dumps(evil))  # torch would read this one
                dst.writestr(name.replace("model_weights_config.json", "weight_999"), pickle.dumps(_Touch(marker)))
            dst.writestr(name, data)  # the clean copy, last: what zipfile alone would check
    with pytest.raises(ArtifactError, match="duplicate entry names"):
        prunec.load(program)
    assert not marker.exists()


def test_lock_file_symlink_is_not_followed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".trust.lock").symlink_to(victim)
    with pytest.raises(prunec.BuildError, match="build lock"):
        prunec.build(write_spec(tmp_path, SPEC), out)
    assert victim.read_text() == "precious"
    assert not (out / "trust").exists()
