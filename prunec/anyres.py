"""LLaVA-NeXT's anyres image layout as a gather map, computed on the host from the image sizes.

A loaded artifact runs this (it turns a processor's `image_sizes` into the program's `image_layout`
input), so it is runtime code: its hash is in every artifact's code record.
"""
from __future__ import annotations

import torch


def best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that keeps the most of an image of `size` after an
    aspect-preserving resize, then wastes the least (LLaVA-NeXT's rule)."""
    height, width = size
    best, most_kept, least_waste = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_w * pin_h - kept
        if kept > most_kept or (kept == most_kept and waste < least_waste):
            best, most_kept, least_waste = (pin_h, pin_w), kept, waste
    return best


def _unpadded(rows: int, cols: int, height: int, width: int) -> tuple[range, range]:
    """The grid rows and columns left after cutting the padding a resize of a height x width image
    into the rows x cols grid added (centred on the short side)."""
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return range(pad, rows - pad), range(cols)
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return range(rows), range(pad, cols - pad)


def anyres_layout(layout: dict, image_sizes: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(crops per image, gather map): for every image token of the images in order, its row in the
    flattened [crops x patches] features of all images' crops, or -1 for a newline. `layout`: crop
    side, patch side and grid pinpoints, in pixels."""
    crop = layout["crop"]
    side = crop // layout["patch"]
    patches = side * side
    index, crops, offset = [], [], 0
    for height, width in image_sizes:
        grid_h, grid_w = (n // crop for n in best_resolution((height, width), layout["pinpoints"]))
        index += range(offset, offset + patches)  # the base crop, in patch order
        ys, xs = _unpadded(grid_h * side, grid_w * side, height, width)
        for y in ys:
            for x in xs:
                tile = 1 + (y // side) * grid_w + x // side
                index.append(offset + tile * patches + (y % side) * side + x % side)
            index.append(-1)
        crops.append(1 + grid_h * grid_w)
        offset += crops[-1] * patches
    return crops, index


def derive_anyres(layout: dict, pixel_values: torch.Tensor, image_sizes: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A processor's (pixel_values [images, crops, 3, H, W] zero-padded to the most crops, image_sizes
    [images, 2]) -> the program's (pixel_values [all real crops, 3, H, W], image_layout [image tokens]),
    and each image's token count."""
    sizes = [tuple(int(v) for v in size) for size in image_sizes.tolist()]
    if any(h < 1 or w < 1 for h, w in sizes):
        raise ValueError(f"image sizes must be positive, got {sizes}")
    crops, index = anyres_layout(layout, sizes)
    short = next((i for i, n in enumerate(crops) if n > pixel_values.shape[1]), None)
    if short is not None:
        raise ValueError(f"image {short} of {sizes[short][0]}x{sizes[short][1]} takes {crops[short]} crops, "
                         f"pixel_values holds {pixel_values.shape[1]} per image")
    real = torch.cat([pixel_values[i, :n] for i, n in enumerate(crops)]) if crops else pixel_values.flatten(0, 1)[:0]
    _, per_image = zip(*(anyres_layout(layout, [size]) for size in sizes)) if sizes else ((), ())
    return real, torch.tensor(index, dtype=torch.long, device=pixel_values.device), [len(i) for i in per_image]
