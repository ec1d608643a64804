"""LLaVA (`LlavaForConditionalGeneration`): a vision tower, a projector and a Llama-style LLM.

Candidates are the image tokens, found as `input_ids == config.image_token_id`; their count per
image is read from the projector's output shape in the captured graph. Text (system prompt,
question, padding) is never a candidate. A row may hold several images (`inputs.images`, each with
its own span of image tokens, in the order of `pixel_values`); the pixel batch is its own dynamic
dimension, and the candidate count per row (checked at run time) pins the images per row.
"""
from __future__ import annotations


import torch
from torch import fx
from torch.export import Dim
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import register_adapter
from .base import (LLAMA_SUB_BLOCKS, Adapter, Domain, ExampleShape, batch_dim, last_logits,
                   llama_attention_dims, module_path, random_token_ids, token_rules)

_LLM = "hf.model.language_model"
_PROJECTOR = "hf.model.multi_modal_projector"
_VISION = "hf.model.vision_tower"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


class _Llava(torch.nn.Module):
    """Runs the vision tower and projector itself and hands HF the features as one tensor: HF's
    `get_image_features` returns `list(features)`, which would bake the image count into the graph."""

    def __init__(self, model, last_logits: bool):
        super().__init__()
        self.hf, self.logits_to_keep = model, int(last_logits)  # 0 = every position

    def forward(self, input_ids, attention_mask, pixel_values):
        return self.logits(input_ids, attention_mask, self.crop_features(pixel_values).flatten(0, 1))

    def crop_features(self, pixel_values):
        """[images or crops, patches, D]: the projected vision features of each picture."""
        config, llava = self.hf.config, self.hf.model
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError("prunec supports one vision_feature_layer (an int)")
        vision = llava.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        features = vision.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return llava.multi_modal_projector(features)

    def logits(self, input_ids, attention_mask, image_tokens):
        """HF's forward with the image tokens' features given as one tensor."""
        image = BaseModelOutputWithPooling(pooler_output=(image_tokens,))
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs={"image": image},
                       use_cache=False, logits_to_keep=self.logits_to_keep).logits


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    span = "image"
    protectable = ("text",)
    output_sites = {"projector.output": "llm"}
    needs_seq_len = True
    needs_image = True
    generates = True
    sub_blocks = LLAMA_SUB_BLOCKS
    image_domains = ("llm",)

    def domains(self):
        text = self.config.text_config
        return {"llm": Domain("llm", f"{_LLM}.layers", text.num_hidden_layers, f"{_LLM}.rotary_emb",
                              f"{_LLM}.norm")}

    def layer_dims(self, domain):
        text = self.config.text_config
        return text.hidden_size, text.intermediate_size, 3

    def decoder(self, model):
        return model.model.language_model, model.lm_head

    def attention_dims(self, domain):
        return llama_attention_dims(self.config.text_config)

    def fixed_macs(self, inputs):
        """The vision tower (HF runs all its layers; two-matrix MLPs) and the projector, per image."""
        vision, text = self.config.vision_config, self.config.text_config
        n = (inputs["image_size"] // vision.patch_size) ** 2 + 1  # patches + [CLS]
        d, m = vision.hidden_size, vision.intermediate_size
        images = inputs.get("images", 1)
        tower = images * vision.num_hidden_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
        image_tokens = images * self.image_tokens_per_image()
        projector = image_tokens * (d * text.hidden_size + text.hidden_size * text.hidden_size)
        return {"vision tower": tower, "projector": projector}

    def wrap(self, model, output=None):
        return _Llava(model, last_logits(output))

    def input_names(self):
        return ("input_ids", "attention_mask", "pixel_values")

    def input_rules(self, inputs):
        images, per_image, token = inputs.get("images", 1), self.image_tokens_per_image(), self.config.image_token_id
        if "images_per_row" in inputs:  # any image count in the bounds; pixel_values holds all rows' images
            bounds = inputs["images_per_row"]
            allowed = [n * per_image for n in range(bounds["min"], bounds["max"] + 1)]
            return [*token_rules(self.config.text_config.vocab_size),
                    {"kind": "count_per_row", "input": "input_ids", "token": token, "allowed": allowed,
                     "what": f"image tokens ({per_image} per image, {bounds['min']}..{bounds['max']} images)"},
                    {"kind": "rows_for_tokens", "input": "pixel_values", "per": "input_ids", "token": token,
                     "tokens": per_image, "what": "images"}]
        return [*token_rules(self.config.text_config.vocab_size),
                {"kind": "count_per_row", "input": "input_ids", "token": token,
                 "count": images * per_image, "what": "image tokens"},
                {"kind": "rows_per_row", "input": "pixel_values", "per": "input_ids", "count": images,
                 "what": "images"}]

    def seq_len_range(self):
        return self.image_tokens_per_image() + 2, self.config.text_config.max_position_embeddings

    def default_image_size(self):
        return self.config.vision_config.image_size

    def image_tokens_per_image(self) -> int:
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def example_inputs(self, shape: ExampleShape, seed: int):
        gen = torch.Generator().manual_seed(seed)
        text = self.config.text_config
        n_image = self.image_tokens_per_image()
        special = {text.pad_token_id, text.bos_token_id, text.eos_token_id, self.config.image_token_id}
        ids = random_token_ids((shape.batch, shape.seq_len), text.vocab_size, special, gen)
        if shape.images == 1:
            starts = [min(2, shape.seq_len - n_image)]
        else:  # equal text gaps before, between and after the images
            gap = (shape.seq_len - shape.images * n_image) // (shape.images + 1)
            starts = [gap + i * (n_image + gap) for i in range(shape.images)]
        for start in starts:
            ids[:, start:start + n_image] = self.config.image_token_id
        size = shape.image_size or self.default_image_size()
        pixels = torch.randn(shape.batch * shape.images, 3, size, size, generator=gen)
        return ids, torch.ones_like(ids), pixels

    def dynamic_shapes(self, min_tokens):
        batch = batch_dim()
        low = max(self.image_tokens_per_image() + 2, min_tokens)
        seq = Dim("seq", min=low, max=self.config.text_config.max_position_embeddings)
        return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: Dim("images", min=1, max=1 << 16)})

    def candidate_mask(self, graph: fx.Graph, site_value: fx.Node, protect, cut):
        input_ids = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "input_ids")
        for user in input_ids.users:  # one mask serves every stage
            if user.target is torch.ops.aten.eq.Scalar and user.args[1] == self.config.image_token_id:
                return user
        with graph.inserting_after(input_ids):
            mask = graph.call_function(torch.ops.aten.eq.Scalar, (input_ids, self.config.image_token_id))
        ids = input_ids.meta["val"]
        with ids.fake_mode:
            mask.meta["val"] = torch.empty_like(ids, dtype=torch.bool)
        return mask

    def initial_candidates_from_config(self, inputs, protect):
        return self.image_tokens_per_image() * inputs.get("images", 1)

    def patch_positions(self, inputs, row):
        ids = inputs[0][row]
        return (ids == self.config.image_token_id).nonzero().flatten().tolist(), ids.shape[0]

    def vision_feature_layer(self):
        """hidden_states[h] is vision layer h-1's output; `vision_feature_layer` picks h."""
        layer = self.config.vision_feature_layer % (self.config.vision_config.num_hidden_layers + 1) - 1
        if layer < 0:
            raise ValueError("vision_feature_layer selects the embeddings, which have no attention")
        return layer

    def vision_attention(self, gm, layer):
        n_layers = self.config.vision_config.num_hidden_layers
        sdpa = [n for n in gm.graph.nodes if n.target is _SDPA and module_path(n).startswith(_VISION)]
        if len(sdpa) != n_layers:
            raise ValueError(f"expected one scaled_dot_product_attention call per vision layer ({n_layers}), found "
                             f"{len(sdpa)}; the vision tower must use attn_implementation sdpa")
        path = module_path(sdpa[layer]) + "." if 0 <= layer < n_layers else ""
        if not any(f".{name}.{layer}." in path for name in ("layers", "layer")):  # CLIP: layers, DINOv2: layer
            raise ValueError(f"vision layer {layer} has no attention in the captured graph (layers 0..{n_layers - 1})")
        return sdpa[layer], int(self.config.vision_feature_select_strategy == "default")

    def projector_input(self, gm):
        """The [images, patches, vision width] features the projector reads (the selected feature layer)."""
        span = [n for n in gm.graph.nodes if module_path(n).startswith(_PROJECTOR)]
        inside = set(span)
        inputs = {a for n in span for a in n.all_input_nodes if a not in inside
                  and getattr(a.meta.get("val"), "ndim", 0) == 3 and a.meta["val"].is_floating_point()}
        if len(inputs) != 1:
            raise ValueError(f"expected one [images, patches, width] input to {_PROJECTOR}, found {len(inputs)}")
        return inputs.pop()

    def check_candidates(self, gm, expected):
        projected = [n for n in gm.graph.nodes if module_path(n).startswith(_PROJECTOR)
                     and hasattr(n.meta.get("val"), "shape")]
        if not projected:
            raise ValueError(f"no node of {_PROJECTOR} in the captured graph")
        found = int(projected[-1].meta["val"].shape[-2])
        if found != expected:
            raise ValueError(f"the projector emits {found} tokens per image, the config implies {expected}")

    def output_cut(self, gm, site):
        nodes = list(gm.graph.nodes)
        start = next(i for i, n in enumerate(nodes) if module_path(n).startswith(_LLM)
                     and not module_path(n).startswith(f"{_LLM}.embed_tokens"))
        hidden = self.config.text_config.hidden_size
        before = set(nodes[:start])
        embeds = {a for n in nodes[start:] for a in n.all_input_nodes if a in before
                  and getattr(a.meta.get("val"), "ndim", 0) == 3 and a.meta["val"].shape[-1] == hidden
                  and a.meta["val"].is_floating_point()}
        if len(embeds) != 1:
            raise ValueError(f"expected one [B, S, {hidden}] input to the LLM, found {len(embeds)}")
        return nodes[start - 1], embeds.pop()


