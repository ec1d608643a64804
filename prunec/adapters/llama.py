"""Llama-style causal LMs (Llama, SmolLM). Captured and emitted; there is no image
span, and text-token pruning is not implemented yet, so stages are rejected at validation."""
from __future__ import annotations

import torch

from . import register_adapter
from .base import Domain, TextAdapter


class _CausalLM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@register_adapter
class LlamaAdapter(TextAdapter):
    family = "llama"
    model_types = ("llama",)

    def domains(self):
        return {"llm": Domain("llm", "hf.model.layers", self.config.num_hidden_layers, "hf.model.rotary_emb")}

    def layer_dims(self, domain):
        return self.config.hidden_size, self.config.intermediate_size, 3

    def wrap(self, model):
        return _CausalLM(model)
