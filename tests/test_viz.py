"""Keep-maps: the drawn image shows exactly the kept patches, checked cell by cell against kept sets
from the independent hook references, for a pre-LLM, an in-LLM and an in-ViT stage."""
from __future__ import annotations

import io
import xml.etree.ElementTree as ElementTree

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO
from prunec import viz
from prunec.adapters.base import ExampleShape
from prunec.cli import app
from prunec.models import load_model
from reference import HookReference, slow_divprune, reference_stages

SPECS = {
    "pre-llm": """
        prunec: 1
        name: viz-pre-llm
        model: {builtin: tiny-llava}
        inputs: {batch: 1, seq_len: 30}
        pipeline:
          - {site: projector.output, method: divprune, keep: {count: 6}}
    """,
    "in-llm": """
        prunec: 1
        name: viz-in-llm
        model: {builtin: tiny-llava}
        inputs: {batch: 1, seq_len: 30}
        pipeline:
          - {site: projector.output, method: divprune, keep: {count: 10}}
          - {site: "llm.layers[1]", method: fastv, keep: {count: 4}}
    """,
    "in-vit": """
        prunec: 1
        name: viz-in-vit
        model: {builtin: tiny-vit}
        inputs: {batch: 1}
        pipeline:
          - {site: "vision.layers[0]", method: divprune, keep: {count: 7}}
    """,
}


def _reference_kept(plan, picture):
    """Kept patch sets from the hook references, on the same inputs keep_map builds."""
    hf = load_model(plan.lock["model"], plan.spec.base_dir)
    inputs = plan.lock["inputs"]
    example = list(plan.adapter.example_inputs(ExampleShape(1, inputs.get("seq_len"), inputs["image_size"]), 0))
    example[-1] = viz.image_tensor(picture, inputs["image_size"])
    if plan.adapter.family == "llava":
        stages = reference_stages(plan)
        reference = HookReference(hf, stages)
        reference(*example)
        return reference.kept
    captured = {}
    hf.layers[0].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    with torch.no_grad():
        hf(pixel_values=example[0], interpolate_pos_encoding=True)
    hidden = captured["h"][0]
    return [set(slow_divprune(hidden[1:], plan.stages[0].n_keep))]  # patch i is token i + 1


def _cells(image: Image.Image, lay: viz.Layout, panel: int):
    x0, y0 = lay.panel_origin(panel)
    for patch in range(lay.grid * lay.grid):
        r, c = divmod(patch, lay.grid)
        box = (x0 + c * lay.cell, y0 + r * lay.cell, x0 + (c + 1) * lay.cell, y0 + (r + 1) * lay.cell)
        yield patch, list(image.crop(box).getdata())


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_keep_map_shows_exactly_the_kept_patches(build, kind):
    plan, module, _ = build(SPECS[kind])
    picture = viz.default_picture()
    drawing, kept = viz.keep_map(plan, module, picture)
    assert kept == _reference_kept(plan, picture)
    lay = viz.layout(plan)
    assert drawing.size == lay.size
    base = picture.convert("RGB").resize((lay.panel, lay.panel), Image.Resampling.BICUBIC)
    expected_panel = Image.new("RGB", (lay.panel * 0 + lay.size[0], lay.size[1]))
    expected_panel.paste(base, lay.panel_origin(0))
    reference_cells = dict(_cells(expected_panel, lay, 0))
    for panel in range(lay.panels):
        for patch, pixels in _cells(drawing, lay, panel):
            original = reference_cells[patch]
            undimmed = panel == 0 or patch in kept[panel - 1]
            wanted = original if undimmed else [tuple(v // 4 + 96 for v in px) for px in original]
            assert pixels == wanted, f"panel {panel} patch {patch} should be {'kept' if undimmed else 'dimmed'}"
    assert any(len(k) < lay.grid * lay.grid for k in kept)


def test_keep_map_is_deterministic(build):
    plan, module, _ = build(SPECS["in-llm"])
    outputs = []
    for _ in range(2):
        drawing, _ = viz.keep_map(plan, module, viz.default_picture())
        buffer = io.BytesIO()
        viz.save(drawing, buffer)
        outputs.append(buffer.getvalue())
    assert outputs[0] == outputs[1]


def test_cli_viz_png_and_svg(build, tmp_path):
    _, _, artifact = build(SPECS["in-vit"])
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    png = CliRunner().invoke(app, ["viz", str(artifact), "--image", str(tmp_path / "red.png"), "-o", str(tmp_path / "k.png")])
    assert png.exit_code == 0, png.output
    assert Image.open(tmp_path / "k.png").size == viz.layout(_plan_of(artifact)).size
    svg = CliRunner().invoke(app, ["viz", str(artifact), "--format", "svg", "-o", str(tmp_path / "k.svg")])
    assert svg.exit_code == 0, svg.output
    assert ElementTree.parse(tmp_path / "k.svg").getroot().tag.endswith("svg")
    bad = CliRunner().invoke(app, ["viz", str(artifact), "--image", str(tmp_path / "k.svg"), "-o", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "cannot read image" in bad.output


def _plan_of(artifact):
    import prunec

    return prunec.plan(artifact / "spec.lock.yaml")


def test_committed_schema_and_keep_map_are_current(tmp_path):
    """The schema file the shipped specs point editors at, and the README's keep-map, are what the
    commands in the README regenerate."""
    schema = CliRunner().invoke(app, ["schema"]).output
    assert (REPO / "schema" / "prunec-spec.schema.json").read_text() == schema
    for spec in list((REPO / "specs").glob("*.yaml")) + list((REPO / "examples").glob("*.yaml")):
        assert spec.read_text().startswith("# yaml-language-server: $schema=../schema/prunec-spec.schema.json\n")
    out = tmp_path / "keep-map.png"
    result = CliRunner().invoke(app, ["viz", str(REPO / "examples" / "quickstart.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (REPO / "docs" / "keep-map-quickstart.png").read_bytes()
