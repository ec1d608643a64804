"""Vision encoders with a [CLS] token: ViT, CLIP vision, DINOv2.

Captured with a dynamic square image size (position embeddings interpolate), so the token axis is a
symbol in the graph. Candidates are the patch tokens; [CLS] (and DINOv2 register tokens) are
protected unless a stage drops `cls` from `protect:`.
"""
from __future__ import annotations

import math

import torch

import prunec.ops  # noqa: F401  (torch.ops.prunec.span_mask)
from torch.export import Dim

from . import register_adapter
from .base import Adapter, Domain, ExampleShape, batch_dim


class _VisionEncoder(torch.nn.Module):
    def __init__(self, model, interpolate: bool):
        super().__init__()
        self.hf = model
        self.interpolate = interpolate

    def forward(self, pixel_values):
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        return self.hf(pixel_values=pixel_values, **extra).last_hidden_state


class _VisionAdapter(Adapter):
    span = "patches"
    protectable = ("cls",)
    output_sites = {"vision.output": "vision"}
    needs_image = True
    layers_path: str
    interpolate = True

    def domains(self):
        return {"vision": Domain("vision", self.layers_path, self.config.num_hidden_layers, None)}

    def tokens_at_input(self, domain, inputs):
        return (inputs["image_size"] // self.config.patch_size) ** 2 + self.leading_tokens()

    def wrap(self, model, output=None):
        return _VisionEncoder(model, self.interpolate)

    def input_names(self):
        return ("pixel_values",)

    def default_image_size(self):
        return self.config.image_size

    def input_rules(self, inputs):
        # The capture keeps the image side symbolic (the token axis is derived from it), but HF's
        # position-embedding interpolation takes its same-size shortcut during export, so the
        # program only computes correctly at the size it was built for.
        side = inputs["image_size"]
        return [{"kind": "fixed_axes", "input": "pixel_values", "axes": {"2": side, "3": side}, "what": "images of",
                 "why": f"position embeddings were captured for {side} px"}]

    def leading_tokens(self) -> int:
        """[CLS] plus any register tokens, which sit before the patches."""
        return 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)

    def patch_positions(self, inputs, row):
        side = inputs[0].shape[-1] // self.config.patch_size
        lead = self.leading_tokens()
        return list(range(lead, lead + side * side)), lead + side * side

    def example_inputs(self, shape: ExampleShape, seed: int):
        gen = torch.Generator().manual_seed(seed)
        size = shape.image_size or self.default_image_size()
        return (torch.randn(shape.batch, 3, size, size, generator=gen),)

    def dynamic_shapes(self, min_tokens):
        low = max(1, math.ceil(math.sqrt(max(min_tokens - self.leading_tokens(), 1))))
        side = Dim("patches_per_side", min=low, max=128)
        patch = self.config.patch_size
        return ({0: batch_dim(), 2: patch * side, 3: patch * side},)

    def candidate_mask(self, graph, site_value, protect, cut):
        first = self.leading_tokens() if "cls" in protect else 0
        with graph.inserting_after(cut):
            return graph.call_function(torch.ops.prunec.span_mask.default, (site_value, first))

    def initial_candidates_from_config(self, inputs, protect):
        patches = (inputs["image_size"] // self.config.patch_size) ** 2
        return patches + (0 if "cls" in protect else self.leading_tokens())

    def output_cut(self, gm, site):
        output = gm.graph.output_node()
        value = output.args[0]
        value = value[0] if isinstance(value, (tuple, list)) else value
        return output.prev, value


@register_adapter
class ViTAdapter(_VisionAdapter):
    family = "vit"
    model_types = ("vit",)
    layers_path = "hf.layers"


@register_adapter
class CLIPVisionAdapter(_VisionAdapter):
    family = "clip_vision"
    model_types = ("clip_vision_model",)
    layers_path = "hf.encoder.layers"


@register_adapter
class Dinov2Adapter(_VisionAdapter):
    family = "dinov2"
    model_types = ("dinov2",)
    layers_path = "hf.encoder.layer"
    interpolate = False  # DINOv2 always interpolates its position embeddings
