"""The command line and the shipped specs, as a user meets them."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

import prunec
from conftest import REPO, write_spec
from prunec.cli import app

SHIPPED = (sorted((REPO / "specs").glob("*.yaml")) + sorted((REPO / "examples").glob("*.yaml"))
           + sorted((REPO / "benchmarks" / "specs").glob("*.yaml")))


def test_quickstart_builds_and_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prunec.cli", "build", "examples/quickstart.yaml", "-o", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # tokens per row: 40 in; DivPrune keeps 8 of 16 image tokens (40 -> 32); FastV keeps 4 (32 -> 28)
    assert "40 -> 32" in proc.stdout and "32 -> 28" in proc.stdout
    artifact = tmp_path / "quickstart"
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.pt2", "module.py", "spec.lock.yaml",
                                                              "weights.safetensors"]
    assert "torch.ops.prunec.select_divprune" in (artifact / "module.py").read_text()
    run = subprocess.run([sys.executable, "-m", "prunec.cli", "run", str(artifact), "--batch", "3"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "output: (3, 28, 256)" in run.stdout and "finite: True" in run.stdout


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_specs_validate(path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_printed_schema_is_draft_2020_12_and_accepts_shipped_specs():
    result = CliRunner().invoke(app, ["schema"])
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in SHIPPED:
        data = yaml.safe_load(path.read_text())
        if "extends" not in data:
            jsonschema.Draft202012Validator(schema).validate(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({"prunec": 1, "name": "x", "model": {"builtin": "tiny-llava"},
                                                          "pipeline": [], "surprise": 1})


def test_extends_patches_a_stage_by_id_and_deletes_with_null(tmp_path):
    write_spec(tmp_path, """
        prunec: 1
        name: base
        description: base description
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 40}
        pipeline:
          - {id: pre, site: projector.output, method: divprune, keep: {ratio: 0.5}}
          - {id: late, site: "llm.layers[2]", method: fastv, keep: {ratio: 0.25}}
    """, "base.yaml")
    child = write_spec(tmp_path, """
        prunec: 1
        extends: base.yaml
        name: child
        description: null
        pipeline:
          late:
            keep: {count: 2}
            params: {query: all}
    """, "child.yaml")
    plan = prunec.plan(child)
    assert plan.lock["name"] == "child" and plan.lock["description"] == ""
    assert [(s.site, s.n_keep, s.param_dict.get("query")) for s in plan.stages] == [
        ("projector.output", 8, None), ("llm.layers[2]", 2, "all")]


def test_site_lists_expand_with_per_layer_budgets(tmp_path):
    spec = write_spec(tmp_path, """
        prunec: 1
        name: pyramid
        model: {builtin: tiny-llava}
        inputs: {batch: 1, seq_len: 40}
        pipeline:
          - {site: "llm.layers[0, 1, 2]", method: fastv, keep: {ratio: [0.75, 0.5, 0.25]}}
    """)
    plan = prunec.plan(spec)
    assert [(s.site, s.n_candidates, s.n_keep) for s in plan.stages] == [
        ("llm.layers[0]", 16, 12), ("llm.layers[1]", 12, 8), ("llm.layers[2]", 8, 4)]


def test_explain_reports_flops_from_the_formula(tmp_path):
    result = CliRunner().invoke(app, ["explain", str(REPO / "examples" / "quickstart.yaml")])
    assert result.exit_code == 0, result.output
    d, m = 64, 128  # tiny-llava text model: hidden 64, FFN 128, SwiGLU (3 matrices), 4 layers

    def layer(n):
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    expected = (2 * layer(32) + 2 * layer(28)) / (4 * layer(40))
    assert f"prefill FLOPs: {expected:.1%} of unpruned" in result.output


def test_run_rejects_a_directory_that_is_not_an_artifact(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path)])
    assert result.exit_code == 2 and "not a prunec artifact" in result.output
