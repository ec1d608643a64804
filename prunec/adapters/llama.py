"""Llama-style causal LMs (Llama, SmolLM). Captured and emitted; there is no image
span, and text-token pruning is not implemented yet, so stages are rejected at validation."""
from __future__ import annotations

import torch

from . import register_adapter
from .base import Domain, TextAdapter, llama_attention_dims


class _CausalLM(torch.nn.Module):
    def __init__(self, model, last_logits: bool):
        super().__init__()
        self.hf, self.logits_to_keep = model, int(last_logits)  # 0 = every position

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=self.logits_to_keep).logits


@register_adapter
class LlamaAdapter(TextAdapter):
    family = "llama"
    model_types = ("llama",)
    generates = True

    def domains(self):
        return {"llm": Domain("llm", "hf.model.layers", self.config.num_hidden_layers, "hf.model.rotary_emb")}

    def layer_dims(self, domain):
        return self.config.hidden_size, self.config.intermediate_size, 3

    def decoder(self, model):
        return model.model, model.lm_head

    def attention_dims(self, domain):
        return llama_attention_dims(self.config)

    def wrap(self, model, last_logits: bool = False):
        return _CausalLM(model, last_logits)
