"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres crops, a base crop, and one newline token per row.

Each image is cut into a grid of crops chosen from `config.image_grid_pinpoints` by its size, plus a
base crop of the whole image; the LLM receives the base crop's tokens, then the grid's tokens row by
row with the padding the resize added cut away ("unpad"), each row followed by a newline token
(`image_newline`, carrying the image token id). How many tokens an image gets depends on its size,
so the program never computes the layout from `image_sizes` (data, which torch.export cannot shape
by): `anyres_layout` computes it on the host, from the sizes and the config, as a gather map
`image_layout` (per image token: its row in the flattened crop features, -1 for a newline), and the
program gathers the projected crop features with it. The loaded artifact takes a processor's output
(`pixel_values` [images, crops, 3, H, W] zero-padded to the most crops, `image_sizes` [images, 2])
and derives the program's inputs (`derive_inputs`).

Candidates: image tokens; newline tokens are protected by default (`protect: [text]` makes them
candidates). Rows hold different numbers of image tokens, so budgets are resolved per row at run
time (`prunec/ragged.py`).
"""
from __future__ import annotations

import torch
from torch import fx
from torch.export import Dim

from ..anyres import anyres_layout
from ..errors import PrunecError
from . import register_adapter
from .base import ExampleShape, batch_dim, last_logits, random_token_ids, token_rules
from .llava import LlavaAdapter, _Llava

_LAYOUT = "image_layout"


class _LlavaNext(_Llava):
    """Vision tower and projector over every crop, then the packed image tokens by `image_layout`."""

    def forward(self, input_ids, attention_mask, pixel_values, image_layout):
        flat = self.crop_features(pixel_values).flatten(0, 1)
        rows = torch.cat([flat, self.hf.model.image_newline[None].to(flat.dtype)])
        packed = rows[torch.where(image_layout < 0, rows.shape[0] - 1, image_layout)]
        return self.logits(input_ids, attention_mask, packed)


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    protectable = ("text", "newline")

    def candidates_vary(self, inputs) -> bool:
        return True

    def layout_config(self) -> dict:
        """What the image token layout depends on (recorded in the signature, so a loaded artifact
        derives its inputs without the model's config)."""
        vision = self.config.vision_config
        return {"crop": vision.image_size, "patch": vision.patch_size,
                "pinpoints": [list(p) for p in self.config.image_grid_pinpoints]}

    def wrap(self, model, output=None):
        return _LlavaNext(model, last_logits(output))

    def input_names(self):
        return ("input_ids", "attention_mask", "pixel_values", _LAYOUT)

    def example_image_sizes(self) -> list[tuple[int, int]]:
        """Two sizes that take different grids: the first and the last pinpoint."""
        pins = self.config.image_grid_pinpoints
        return [tuple(pins[0]), tuple(pins[-1])]

    def image_tokens(self, size: tuple[int, int], protect=()) -> int:
        _, index = anyres_layout(self.layout_config(), [size])
        return len(index) - (index.count(-1) if "newline" in protect else 0)

    def tokens_for_image(self, size, protect):
        return self.image_tokens(size), self.image_tokens(size, protect)

    def image_tokens_per_image(self) -> int:
        return max(self.image_tokens(size) for size in self.example_image_sizes())

    def initial_candidates_from_config(self, inputs, protect):
        return self.image_tokens(self.example_image_sizes()[0], protect) * inputs.get("images", 1)

    def input_rules(self, inputs):
        return [*token_rules(self.config.text_config.vocab_size),
                {"kind": "layout_tokens", "input": _LAYOUT, "per": "input_ids",
                 "token": self.config.image_token_id}]

    def derive_inputs(self) -> dict:
        """How a loaded artifact turns a processor's output into the program's inputs (`signature`)."""
        return {"kind": "anyres", "takes": ["input_ids", "attention_mask", "pixel_values", "image_sizes"],
                "token": self.config.image_token_id, **self.layout_config()}

    def example_inputs(self, shape: ExampleShape, seed: int):
        """Row b holds one image of the b-th example size (cycling), its tokens after 2 text tokens."""
        gen = torch.Generator().manual_seed(seed)
        text = self.config.text_config
        sizes = [self.example_image_sizes()[b % 2] for b in range(shape.batch)]
        crops, index = anyres_layout(self.layout_config(), sizes)
        special = {text.pad_token_id, text.bos_token_id, text.eos_token_id, self.config.image_token_id}
        ids = random_token_ids((shape.batch, shape.seq_len), text.vocab_size, special, gen)
        for b, size in enumerate(sizes):
            n = self.image_tokens(size)
            if n + 4 > shape.seq_len:
                raise ValueError(f"inputs.seq_len {shape.seq_len} is too short for an example image of "
                                 f"{size[0]}x{size[1]} ({n} image tokens); use at least {n + 4}")
            ids[b, 2:2 + n] = self.config.image_token_id
        side = self.config.vision_config.image_size
        pixels = torch.randn(sum(crops), 3, side, side, generator=gen)
        return ids, torch.ones_like(ids), pixels, torch.tensor(index)

    def seq_len_range(self):
        return self.image_tokens_per_image() + 4, self.config.text_config.max_position_embeddings

    def dynamic_shapes(self, min_tokens):
        batch = batch_dim()
        seq = Dim("seq", min=max(4, min_tokens), max=self.config.text_config.max_position_embeddings)
        return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: Dim("crops", min=1, max=1 << 16)},
                {0: Dim("image_tokens", min=1, max=1 << 20)})

    def fixed_macs(self, inputs):
        vision, text = self.config.vision_config, self.config.text_config
        crops, index = anyres_layout(self.layout_config(), self.example_image_sizes()[:1])
        n = (vision.image_size // vision.patch_size) ** 2 + 1
        d, m = vision.hidden_size, vision.intermediate_size
        images = inputs.get("images", 1)
        tower = images * crops[0] * vision.num_hidden_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
        projector = images * crops[0] * (n - 1) * (d * text.hidden_size + text.hidden_size * text.hidden_size)
        return {"vision tower": tower, "projector": projector}

    def candidate_mask(self, graph: fx.Graph, site_value: fx.Node, protect, cut):
        images = super().candidate_mask(graph, site_value, protect, cut)
        if "newline" not in protect:
            return images
        for user in images.users:  # one mask serves every stage
            if user.target is torch.ops.aten.logical_xor.default:
                return user
        layout = next(n for n in graph.nodes if n.op == "placeholder" and n.target == _LAYOUT)
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        where = images if list(graph.nodes).index(images) > list(graph.nodes).index(last_input) else last_input
        with graph.inserting_after(where):
            newlines = graph.call_function(torch.ops.prunec.flag_tokens.default, (images, layout))
        with graph.inserting_after(newlines):  # image tokens but not newlines (newlines are image tokens)
            mask = graph.call_function(torch.ops.aten.logical_xor.default, (images, newlines))
        for node in (newlines, mask):
            with images.meta["val"].fake_mode:
                node.meta["val"] = torch.empty_like(images.meta["val"])
        return mask

    def patch_scores(self, b, patches):
        """Each crop's [CLS] scores its own patches; the layout places them on the image tokens."""
        images = super().candidate_mask(b.graph, b.record.site_value, (), b.last)
        layout = next(n for n in b.graph.nodes if n.op == "placeholder" and n.target == _LAYOUT)
        return b.add("score", torch.ops.prunec.layout_scores.default, (patches, images, layout))

    def check_candidates(self, gm, expected):
        """Counts depend on the image sizes; nothing fixed to compare."""

    def patch_positions(self, inputs, row):
        raise PrunecError("keep-maps of LLaVA-NeXT's anyres crops are not implemented yet")

