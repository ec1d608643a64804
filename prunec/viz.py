"""Keep-maps: which image patches survive each stage, drawn over the image.

The artifact runs once under an `fx.Interpreter` that records what every selection op returned;
composing those [B, K] index maps gives, per stage, the original token positions still present, and
the adapter maps positions to patches (LLaVA: the i-th image token is patch i in raster order;
vision encoders: position minus the leading [CLS]/register tokens).

Drawing rule (tests rely on it): every panel carries a faint patch grid (on each cell's first row and
column of pixels); a dropped cell is hatched (pixels with (x + y) % 4 == 0 black, == 1 white); a kept
cell shows the image unchanged except its border pixels, where the grid and the outline of the kept
region run. Brightness carries no meaning, so the map reads the same on dark and light images. The
PNG and the SVG are two renderings of one list of primitives (`scene`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from .errors import PrunecError
from .flops import estimate
from .ops import KEEP_INDEX_OPS
from .spec import Plan

TITLE_HEIGHT = 30
GAP = 8
LEGEND_HEIGHT = 18
AXIS_WIDTH = 44        # y-axis labels left of the bars
CHART_HEIGHT = 96
CHART_LABELS = 30      # layer numbers and domain names under the bars
IMAGE_COLOR, TEXT_COLOR, BACKGROUND, INK = (52, 101, 164), (170, 170, 170), (255, 255, 255), (0, 0, 0)
GRID_COLOR, GRID_OPACITY = (128, 128, 128), 0.35
HATCH_PERIOD = 4       # dropped cells: pixels with (x + y) % 4 == 0 black, == 1 white: visible on any image


def record_selections(module: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Run the module (a loaded artifact, or its GraphModule) once; return each selection op's [B, K]
    keep indices, in graph order."""
    module = getattr(module, "graph_module", module)
    found: list[torch.Tensor] = []

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.op == "call_function" and str(node.target) in {f"prunec.{name}.default" for name in KEEP_INDEX_OPS}:
                found.append(out[0] if isinstance(out, (tuple, list)) else out)  # merges: (index, ...)
            return out

    with torch.no_grad():
        Recorder(module).run(*inputs)
    return found


def grid_side(plan: Plan) -> int:
    config = plan.adapter.config
    vision = getattr(config, "vision_config", config)
    return plan.lock["inputs"]["image_size"] // vision.patch_size


def kept_patches(plan: Plan, inputs: tuple, selections: list[torch.Tensor], row: int = 0) -> list[set[int]]:
    """Per stage, the set of patches still present after it (row `row` of the batch)."""
    patches, length = plan.adapter.patch_positions(inputs, row)
    patch_of = {position: i for i, position in enumerate(patches)}
    positions = torch.arange(length)
    out = []
    for index in selections:
        positions = positions[index[row]]
        out.append({patch_of[p] for p in positions.tolist() if p in patch_of})
    return out


@dataclass(frozen=True)
class Layout:
    grid: int
    cell: int
    panels: int
    layers: int

    @property
    def panel(self) -> int:
        return self.grid * self.cell

    @property
    def bar(self) -> int:
        return max(3, min(14, (self.panels * (self.panel + GAP) - AXIS_WIDTH) // max(1, self.layers)))

    @property
    def chart_top(self) -> int:
        return TITLE_HEIGHT + self.panel + GAP + LEGEND_HEIGHT + TITLE_HEIGHT

    @property
    def size(self) -> tuple[int, int]:
        width = max(GAP + self.panels * (self.panel + GAP), AXIS_WIDTH + self.layers * self.bar + GAP, 360)
        return width, self.chart_top + CHART_HEIGHT + CHART_LABELS + GAP

    def panel_origin(self, index: int) -> tuple[int, int]:
        return GAP + index * (self.panel + GAP), TITLE_HEIGHT


def layout(plan: Plan) -> Layout:
    grid = grid_side(plan)
    layers = sum(len(layer_tokens_of(plan, name)) for name in plan.adapter.domains())
    return Layout(grid, max(4, 160 // grid), 1 + len(plan.stages), layers)


def layer_tokens_of(plan: Plan, domain: str) -> list[tuple[int, int]]:
    from .flops import domain_lengths

    return domain_lengths(plan, domain)


# -- the drawing, as primitives both renderers draw the same way ---------------------------------

@dataclass(frozen=True)
class Picture:
    x: int
    y: int
    image: object  # PIL RGB image


@dataclass(frozen=True)
class Box:
    """A filled rectangle covering pixels x0..x1-1, y0..y1-1."""
    x0: int
    y0: int
    x1: int
    y1: int
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class Line:
    """A horizontal or vertical 1-px line through pixels (x0, y0)..(x1, y1), ends included."""
    x0: int
    y0: int
    x1: int
    y1: int
    color: tuple[int, int, int]
    opacity: float = 1.0


@dataclass(frozen=True)
class Hatch:
    """Diagonal black and white hatching over pixels x0..x1-1, y0..y1-1 (a dropped patch)."""
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class Label:
    x: int
    y: int
    text: str
    color: tuple[int, int, int] = INK


def scene(plan: Plan, picture, kept: list[set[int]]) -> list:
    """The keep-map: the input and one panel per stage (a faint patch grid; kept patches outlined,
    dropped ones hatched), a legend, then tokens per layer with axes, layer numbers and counts."""
    from PIL import Image

    lay = layout(plan)
    base = picture.convert("RGB").resize((lay.panel, lay.panel), Image.Resampling.BICUBIC)
    n_patches = lay.grid * lay.grid
    out: list = []
    titles = [f"input\n{n_patches} patches"] + [
        f"{i}: {s.method}\n{s.site}, {len(k)}/{n_patches} kept" for i, (s, k) in enumerate(zip(plan.stages, kept))]
    for index, title in enumerate(titles):
        x, y = lay.panel_origin(index)
        out += [Picture(x, y, base), Label(x, 1, title)]
        out += _grid(lay, x, y)
        if index:
            out += _patch_marks(lay, x, y, kept[index - 1])
    legend_y = TITLE_HEIGHT + lay.panel + GAP
    out += [Hatch(GAP, legend_y + 2, GAP + 12, legend_y + 14), Label(GAP + 16, legend_y + 2, "dropped (hatched)"),
            Line(GAP + 130, legend_y + 2, GAP + 130, legend_y + 13, INK), Line(GAP + 131, legend_y + 2, GAP + 131,
                                                                               legend_y + 13, BACKGROUND),
            Label(GAP + 136, legend_y + 2, "kept (outlined)")]
    return out + _chart(plan, lay)


def _grid(lay: Layout, x: int, y: int) -> list:
    lines = []
    for i in range(1, lay.grid):
        lines.append(Line(x + i * lay.cell, y, x + i * lay.cell, y + lay.panel - 1, GRID_COLOR, GRID_OPACITY))
        lines.append(Line(x, y + i * lay.cell, x + lay.panel - 1, y + i * lay.cell, GRID_COLOR, GRID_OPACITY))
    return lines


def _patch_marks(lay: Layout, x: int, y: int, kept: set[int]) -> list:
    """Hatch every dropped cell; outline the kept region where it borders a dropped cell or the
    panel edge: a black line on the border pixel and a white one just inside, so it shows on any
    image (all white lines first, so no white line cuts a black one at a corner)."""
    hatches, whites, blacks, c = [], [], [], lay.cell
    for patch in range(lay.grid * lay.grid):
        row, col = divmod(patch, lay.grid)
        x0, y0 = x + col * c, y + row * c
        if patch not in kept:
            hatches.append(Hatch(x0, y0, x0 + c, y0 + c))
            continue
        for d_row, d_col in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            r, k = row + d_row, col + d_col
            if 0 <= r < lay.grid and 0 <= k < lay.grid and r * lay.grid + k in kept:
                continue
            if d_row:  # top or bottom edge
                edge, inner = (y0, y0 + 1) if d_row < 0 else (y0 + c - 1, y0 + c - 2)
                blacks.append(Line(x0, edge, x0 + c - 1, edge, INK))
                whites.append(Line(x0, inner, x0 + c - 1, inner, BACKGROUND))
            else:
                edge, inner = (x0, x0 + 1) if d_col < 0 else (x0 + c - 1, x0 + c - 2)
                blacks.append(Line(edge, y0, edge, y0 + c - 1, INK))
                whites.append(Line(inner, y0, inner, y0 + c - 1, BACKGROUND))
    return hatches + whites + blacks


def _chart(plan: Plan, lay: Layout) -> list:
    """Tokens per layer, every domain in order: image candidates (blue) under the other tokens
    (grey), a y axis in tokens, layer numbers, the domain names, and the count wherever it changes."""
    top = lay.chart_top
    flops = estimate(plan)
    out: list = [Label(GAP, top - TITLE_HEIGHT + 4, f"tokens per layer (image blue, other grey); prefill FLOPs "
                                                    f"{flops['ratio']:.1%} of unpruned")]
    rows = [(name, layer, total, image) for name in plan.adapter.domains()
            for layer, (total, image) in enumerate(layer_tokens_of(plan, name))]
    if not rows:
        return out
    most = max(total for _, _, total, _ in rows)
    bottom = top + CHART_HEIGHT
    left = AXIS_WIDTH
    out.append(Line(left - 1, top, left - 1, bottom, INK))
    out.append(Line(left - 1, bottom, left + len(rows) * lay.bar - 1, bottom, INK))
    for value in (most, most // 2, 0):
        y = bottom - round(CHART_HEIGHT * value / most)
        out += [Line(left - 4, y, left - 2, y, INK), Label(2, max(top - 2, y - 6), f"{value}")]
    previous, last_label = None, -100
    for i, (name, layer, total, image) in enumerate(rows):
        x = left + i * lay.bar
        total_h, image_h = round(CHART_HEIGHT * total / most), round(CHART_HEIGHT * image / most)
        if total_h:
            out.append(Box(x, bottom - total_h, x + lay.bar - 1, bottom, TEXT_COLOR))
        if image_h:
            out.append(Box(x, bottom - image_h, x + lay.bar - 1, bottom, IMAGE_COLOR))
        if total != previous and x - last_label >= 22:  # the count where it changes, if there is room
            out.append(Label(x, max(top - 12, bottom - total_h - 12), str(total)))
            last_label = x
        previous = total
        if layer == 0 or layer % max(1, 24 // lay.bar) == 0:
            out.append(Label(x, bottom + 3, str(layer)))
        if layer == 0:
            out.append(Label(x, bottom + 16, name))
    return out


# -- renderers ---------------------------------------------------------------------------------

def render(plan: Plan, picture, kept: list[set[int]]):
    """The keep-map as a PIL image."""
    return to_png(scene(plan, picture, kept), layout(plan).size)


def _hatch_masks(size: tuple[int, int]):
    from PIL import Image

    width, height = size
    black, white = Image.new("1", size), Image.new("1", size)
    black.putdata([int((x + y) % HATCH_PERIOD == 0) for y in range(height) for x in range(width)])
    white.putdata([int((x + y) % HATCH_PERIOD == 1) for y in range(height) for x in range(width)])
    return black, white


def to_png(primitives: list, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    masks = None
    for item in primitives:
        if isinstance(item, Picture):
            canvas.paste(item.image, (item.x, item.y))
        elif isinstance(item, Box):
            draw.rectangle((item.x0, item.y0, item.x1 - 1, item.y1 - 1), fill=item.fill)
        elif isinstance(item, Line):
            box = (item.x0, item.y0, item.x1 + 1, item.y1 + 1)
            if item.opacity >= 1:
                draw.rectangle((item.x0, item.y0, item.x1, item.y1), fill=item.color)
            else:
                region = canvas.crop(box)
                canvas.paste(Image.blend(region, Image.new("RGB", region.size, item.color), item.opacity), box)
        elif isinstance(item, Hatch):
            masks = masks or _hatch_masks(size)
            box = (item.x0, item.y0, item.x1, item.y1)
            for mask, color in zip(masks, (INK, BACKGROUND)):
                canvas.paste(Image.new("RGB", (item.x1 - item.x0, item.y1 - item.y0), color), box, mask.crop(box))
        else:
            draw.multiline_text((item.x, item.y), item.text, fill=item.color, spacing=1)
    return canvas


def _rgb(color: tuple[int, int, int]) -> str:
    return f"rgb({color[0]},{color[1]},{color[2]})"


def to_svg(primitives: list, size: tuple[int, int]) -> str:
    """The same primitives as SVG: pictures embedded as PNG, lines as 1-px wide rectangles over the
    pixels the PNG fills, the hatch as a pattern anchored at the origin (so it covers the same
    pixels as the PNG's)."""
    import base64
    import io
    from xml.sax.saxutils import escape

    width, height = size
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'shape-rendering="crispEdges">',
             f'<defs><pattern id="hatch" width="{HATCH_PERIOD}" height="{HATCH_PERIOD}" patternUnits="userSpaceOnUse">'
             + "".join(f'<rect x="{x}" y="{y}" width="1" height="1" fill="{_rgb(INK if (x + y) % HATCH_PERIOD == 0 else BACKGROUND)}"/>'
                       for y in range(HATCH_PERIOD) for x in range(HATCH_PERIOD) if (x + y) % HATCH_PERIOD < 2)
             + '</pattern></defs>',
             f'<rect width="{width}" height="{height}" fill="{_rgb(BACKGROUND)}"/>']
    for item in primitives:
        if isinstance(item, Picture):
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG", optimize=False)
            data = base64.b64encode(buffer.getvalue()).decode()
            parts.append(f'<image x="{item.x}" y="{item.y}" width="{item.image.width}" height="{item.image.height}" '
                         f'href="data:image/png;base64,{data}"/>')
        elif isinstance(item, Box):
            parts.append(f'<rect x="{item.x0}" y="{item.y0}" width="{item.x1 - item.x0}" height="{item.y1 - item.y0}" '
                         f'fill="{_rgb(item.fill)}"/>')
        elif isinstance(item, Line):  # a 1-px wide rectangle: covers exactly the pixels the PNG fills
            opacity = f' fill-opacity="{item.opacity}"' if item.opacity < 1 else ""
            parts.append(f'<rect class="line" x="{item.x0}" y="{item.y0}" width="{item.x1 - item.x0 + 1}" '
                         f'height="{item.y1 - item.y0 + 1}" fill="{_rgb(item.color)}"{opacity}/>')
        elif isinstance(item, Hatch):
            parts.append(f'<rect x="{item.x0}" y="{item.y0}" width="{item.x1 - item.x0}" height="{item.y1 - item.y0}" '
                         f'fill="url(#hatch)"/>')
        else:
            lines = item.text.split("\n")
            spans = "".join(f'<tspan x="{item.x}" dy="{0 if i == 0 else 11}">{escape(t)}</tspan>'
                            for i, t in enumerate(lines))
            parts.append(f'<text x="{item.x}" y="{item.y + 9}" font-size="10" font-family="sans-serif" '
                         f'fill="{_rgb(item.color)}">{spans}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render_svg(plan: Plan, picture, kept: list[set[int]]) -> str:
    """The keep-map as SVG, drawn from the same primitives as `render`."""
    return to_svg(scene(plan, picture, kept), layout(plan).size)


def image_tensor(picture, size: int) -> torch.Tensor:
    """A PIL image as a [1, 3, size, size] tensor scaled to [-1, 1]."""
    from PIL import Image

    resized = picture.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    data = torch.tensor(list(resized.getdata()), dtype=torch.float32).view(size, size, 3)
    return (data.permute(2, 0, 1)[None] / 127.5 - 1.0).contiguous()


def default_picture(size: int = 224):
    """A deterministic colourful test card, used when no --image is given."""
    from PIL import Image

    picture = Image.new("RGB", (size, size))
    picture.putdata([(x * 255 // size, y * 255 // size, ((x // 16 + y // 16) % 2) * 200 + 40)
                     for y in range(size) for x in range(size)])
    return picture


def kept_for(plan: Plan, module, picture, seed: int = 0) -> list[set[int]]:
    """Run `module` (the plan's artifact) on `picture`; per stage, the patches still present."""
    from .adapters.base import ExampleShape

    inputs = plan.lock["inputs"]
    if inputs.get("images", 1) > 1:
        raise PrunecError(f"a keep-map draws one image; this plan takes {inputs['images']} per row")
    example = list(plan.adapter.example_inputs(ExampleShape(1, inputs.get("seq_len"), inputs["image_size"]), seed))
    example[-1] = image_tensor(picture, inputs["image_size"])  # pixel_values is the last input
    selections = record_selections(module, tuple(example))
    return kept_patches(plan, tuple(example), selections)


def keep_map(plan: Plan, module, picture, seed: int = 0) -> tuple[object, list[set[int]]]:
    """(the keep-map as a PIL image, kept patch sets) for `module` run on `picture`."""
    kept = kept_for(plan, module, picture, seed)
    return render(plan, picture, kept), kept


def save(image, path) -> None:
    image.save(path, format="PNG", optimize=False)
