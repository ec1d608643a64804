"""Keep-maps: which image patches survive each stage, drawn over the image.

The artifact runs once under an `fx.Interpreter` that records what every selection op returned;
composing those [B, K] index maps gives, per stage, the original token positions still present, and
the adapter maps positions to patches (LLaVA: the i-th image token is patch i in raster order;
vision encoders: position minus the leading [CLS]/register tokens).

Drawing rule (tests rely on it): a kept patch cell shows the image unchanged; a dropped cell shows
`pixel // 4 + 96` (dimmed towards grey).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from .errors import PrunecError
from .flops import estimate, layer_tokens
from .ops import KEEP_INDEX_OPS
from .spec import Plan

TITLE_HEIGHT = 28
GAP = 8
CHART_HEIGHT = 96
IMAGE_COLOR, TEXT_COLOR, BACKGROUND = (52, 101, 164), (160, 160, 160), (255, 255, 255)


def dim(value: int) -> int:
    return value // 4 + 96


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

    @property
    def panel(self) -> int:
        return self.grid * self.cell

    @property
    def size(self) -> tuple[int, int]:
        width = GAP + self.panels * (self.panel + GAP)
        return max(width, 320), TITLE_HEIGHT + self.panel + GAP + TITLE_HEIGHT + CHART_HEIGHT + GAP

    def panel_origin(self, index: int) -> tuple[int, int]:
        return GAP + index * (self.panel + GAP), TITLE_HEIGHT


def layout(plan: Plan) -> Layout:
    grid = grid_side(plan)
    return Layout(grid, max(4, 160 // grid), 1 + len(plan.stages))


def render(plan: Plan, picture, kept: list[set[int]]):
    """The keep-map PNG as a PIL image: the input, then one panel per stage, then tokens per layer."""
    from PIL import Image, ImageDraw

    lay = layout(plan)
    base = picture.convert("RGB").resize((lay.panel, lay.panel), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", lay.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    n_patches = lay.grid * lay.grid
    titles = [f"input\n{n_patches} patches"] + [
        f"{i}: {s.method}\n{s.site}, {len(k)}/{n_patches} kept" for i, (s, k) in enumerate(zip(plan.stages, kept))]
    dimmed = base.point(dim)
    for index, title in enumerate(titles):
        x, y = lay.panel_origin(index)
        panel = base.copy()
        if index:
            for patch in range(n_patches):
                if patch not in kept[index - 1]:
                    r, c = divmod(patch, lay.grid)
                    box = (c * lay.cell, r * lay.cell, (c + 1) * lay.cell, (r + 1) * lay.cell)
                    panel.paste(dimmed.crop(box), box)
        canvas.paste(panel, (x, y))
        draw.multiline_text((x, 1), title, fill=(0, 0, 0), spacing=1)
    _chart(draw, plan, lay)
    return canvas


def _chart(draw, plan: Plan, lay: Layout) -> None:
    """Tokens per layer, image (blue) over text (grey), with the FLOPs share."""
    top = TITLE_HEIGHT + lay.panel + GAP
    flops = estimate(plan)
    draw.text((GAP, top + 8), f"tokens per layer (image blue, text grey); prefill FLOPs {flops['ratio']:.1%} of unpruned",
              fill=(0, 0, 0))
    layers = layer_tokens(plan)
    if not layers:
        return
    most = max(total for total, _ in layers)
    width = max(2, (lay.size[0] - 2 * GAP) // len(layers) - 2)
    bottom = top + TITLE_HEIGHT + CHART_HEIGHT
    for i, (total, image) in enumerate(layers):
        x = GAP + i * (width + 2)
        total_h = round(CHART_HEIGHT * total / most)
        image_h = round(CHART_HEIGHT * image / most)
        draw.rectangle((x, bottom - total_h, x + width - 1, bottom - 1), fill=TEXT_COLOR)
        if image_h:
            draw.rectangle((x, bottom - image_h, x + width - 1, bottom - 1), fill=IMAGE_COLOR)


def render_svg(plan: Plan, picture, kept: list[set[int]]) -> str:
    """The same keep-map as SVG: one rect per patch cell, coloured by the cell's mean colour."""
    image = render(plan, picture, kept)
    lay = layout(plan)
    width, height = lay.size
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    pixels = image.load()
    for index in range(lay.panels):
        x0, y0 = lay.panel_origin(index)
        for r in range(lay.grid):
            for c in range(lay.grid):
                cx, cy = x0 + c * lay.cell + lay.cell // 2, y0 + r * lay.cell + lay.cell // 2
                red, green, blue = pixels[cx, cy]
                parts.append(f'<rect x="{x0 + c * lay.cell}" y="{y0 + r * lay.cell}" width="{lay.cell}" '
                             f'height="{lay.cell}" fill="rgb({red},{green},{blue})"/>')
    titles = ["input"] + [f"{i}: {s.site} {s.method} keep {len(k)}" for i, (s, k) in enumerate(zip(plan.stages, kept))]
    for index, title in enumerate(titles):
        x0, _ = lay.panel_origin(index)
        parts.append(f'<text x="{x0}" y="12" font-size="11" font-family="sans-serif">{title}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


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


def keep_map(plan: Plan, module, picture, seed: int = 0) -> tuple[object, list[set[int]]]:
    """Run `module` (the plan's artifact) on `picture` and return (PIL keep-map, kept patch sets)."""
    from .adapters.base import ExampleShape

    inputs = plan.lock["inputs"]
    if inputs.get("images", 1) > 1:
        raise PrunecError(f"a keep-map draws one image; this plan takes {inputs['images']} per row")
    example = list(plan.adapter.example_inputs(ExampleShape(1, inputs.get("seq_len"), inputs["image_size"]), seed))
    example[-1] = image_tensor(picture, inputs["image_size"])  # pixel_values is the last input
    selections = record_selections(module, tuple(example))
    kept = kept_patches(plan, tuple(example), selections)
    return render(plan, picture, kept), kept


def save(image, path: Path) -> None:
    image.save(path, format="PNG", optimize=False)
