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


def _interior(image: Image.Image, lay: viz.Layout, panel: int, patch: int) -> dict:
    """{(x, y): pixel} of a cell's interior: 2 px in from each side, where neither the patch grid
    (a cell's first row and column) nor a kept region's outline (two pixels wide) may run."""
    x0, y0 = lay.panel_origin(panel)
    r, c = divmod(patch, lay.grid)
    left, top = x0 + c * lay.cell, y0 + r * lay.cell
    return {(x, y): image.getpixel((x, y)) for y in range(top + 2, top + lay.cell - 2)
            for x in range(left + 2, left + lay.cell - 2)}


def _dark_digit():
    """A white stroke on black: kept and dropped must read right where brightness says nothing."""
    from PIL import ImageDraw

    picture = Image.new("RGB", (224, 224), (0, 0, 0))
    ImageDraw.Draw(picture).line((60, 40, 160, 40, 100, 190), fill=(255, 255, 255), width=18)
    return picture


PICTURES = {"test-card": viz.default_picture, "dark-digit": _dark_digit}


@pytest.mark.parametrize("picture_kind", sorted(PICTURES))
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_keep_map_shows_exactly_the_kept_patches(build, kind, picture_kind):
    """Kept cells show the image untouched; dropped cells carry the black-and-white hatch over the
    image, whatever the image's brightness; the input panel is untouched everywhere."""
    plan, module, _ = build(SPECS[kind])
    picture = PICTURES[picture_kind]()
    drawing, kept = viz.keep_map(plan, module, picture)
    assert kept == _reference_kept(plan, picture)
    lay = viz.layout(plan)
    assert drawing.size == lay.size and lay.cell >= 6  # cells large enough to have an interior
    base = picture.convert("RGB").resize((lay.panel, lay.panel), Image.Resampling.BICUBIC)
    x_in, y_in = lay.panel_origin(0)
    for panel in range(lay.panels):
        x0, y0 = lay.panel_origin(panel)
        for patch in range(lay.grid * lay.grid):
            for (x, y), pixel in _interior(drawing, lay, panel, patch).items():
                original = base.getpixel((x - x0, y - y0))
                if panel == 0 or patch in kept[panel - 1]:
                    assert pixel == original, f"panel {panel} patch {patch} is kept: its image must be untouched"
                elif (x + y) % 4 == 0:
                    assert pixel == (0, 0, 0), f"panel {panel} patch {patch} is dropped: hatch pixel must be black"
                elif (x + y) % 4 == 1:
                    assert pixel == (255, 255, 255), f"panel {panel} patch {patch} is dropped: hatch must be white"
                else:
                    assert pixel == original
    assert any(len(k) < lay.grid * lay.grid for k in kept)


def _svg_primitives(text: str) -> list:
    """The keep-map's primitives read back from its SVG (independently of to_svg's code path)."""
    import base64
    import re

    root = ElementTree.fromstring(text)
    ns = "{http://www.w3.org/2000/svg}"
    rgb = lambda value: tuple(int(v) for v in re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", value).groups())
    out = []
    for element in root:
        tag, a = element.tag.removeprefix(ns), element.attrib
        if tag == "image":
            png = Image.open(io.BytesIO(base64.b64decode(a["href"].split(",", 1)[1]))).convert("RGB")
            out.append(("picture", int(a["x"]), int(a["y"]), png.tobytes()))
        elif tag == "rect" and a.get("fill") == "url(#hatch)":
            out.append(("hatch", int(a["x"]), int(a["y"]), int(a["x"]) + int(a["width"]), int(a["y"]) + int(a["height"])))
        elif tag == "rect" and a.get("class") == "line":
            x0, y0 = int(a["x"]), int(a["y"])
            out.append(("line", x0, y0, x0 + int(a["width"]) - 1, y0 + int(a["height"]) - 1, rgb(a["fill"]),
                        float(a.get("fill-opacity", 1.0))))
        elif tag == "rect" and "x" in a:
            out.append(("box", int(a["x"]), int(a["y"]), int(a["x"]) + int(a["width"]), int(a["y"]) + int(a["height"]),
                        rgb(a["fill"])))
        elif tag == "text":
            out.append(("label", int(a["x"]), int(a["y"]) - 9, "\n".join(t.text for t in element), rgb(a["fill"])))
    return out


def _as_tuples(primitives: list) -> list:
    out = []
    for p in primitives:
        if isinstance(p, viz.Picture):
            out.append(("picture", p.x, p.y, p.image.tobytes()))
        elif isinstance(p, viz.Hatch):
            out.append(("hatch", p.x0, p.y0, p.x1, p.y1))
        elif isinstance(p, viz.Box):
            out.append(("box", p.x0, p.y0, p.x1, p.y1, p.fill))
        elif isinstance(p, viz.Line):
            out.append(("line", p.x0, p.y0, p.x1, p.y1, p.color, p.opacity))
        else:
            out.append(("label", p.x, p.y, p.text, p.color))
    return out


def test_svg_holds_the_same_drawing_as_the_png(build):
    plan, module, _ = build(SPECS["in-llm"])
    picture = _dark_digit()
    kept = viz.kept_for(plan, module, picture)
    primitives = viz.scene(plan, picture, kept)
    svg = viz.render_svg(plan, picture, kept)
    assert _svg_primitives(svg) == _as_tuples(primitives)
    # and the PNG is those primitives drawn: a hatch or an outline wherever the SVG has one
    png = viz.render(plan, picture, kept)
    for p in primitives:
        if isinstance(p, viz.Hatch):
            assert png.getpixel((p.x0 + (-(p.x0 + p.y0)) % 4, p.y0)) == (0, 0, 0)
        if isinstance(p, viz.Line) and p.opacity == 1:  # midpoints: corners are shared with other lines
            assert png.getpixel(((p.x0 + p.x1) // 2, (p.y0 + p.y1) // 2)) == p.color


def test_chart_labels_layers_counts_and_axis(build):
    """In-LLM spec on tiny-llava (30 tokens, 16 image tokens, 4 layers): DivPrune keeps 10 before the
    LLM (24 tokens), FastV after layer 1 keeps 4 (18 tokens from layer 2 on)."""
    plan, module, _ = build(SPECS["in-llm"])
    kept = viz.kept_for(plan, module, viz.default_picture())
    labels = [p.text for p in viz.scene(plan, viz.default_picture(), kept) if isinstance(p, viz.Label)]
    assert {"24", "18", "12", "0"} <= set(labels)  # counts where they change; axis max, half, zero
    assert {"0", "1", "2", "3", "llm"} <= set(labels)  # layer numbers and the domain name
    assert "0: divprune\nprojector.output, 10/16 kept" in labels and "1: fastv\nllm.layers[1], 4/16 kept" in labels


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
    unwritable = CliRunner().invoke(app, ["viz", str(artifact), "-o", str(tmp_path / "missing" / "k.png")])
    assert unwritable.exit_code == 2 and unwritable.output.strip().startswith("error: cannot write")
    assert len(unwritable.output.strip().splitlines()) == 1


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
