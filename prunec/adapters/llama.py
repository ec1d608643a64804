"""Llama-style causal LMs (Llama, SmolLM). Captured and emitted; there is no image
span, and text-token pruning is not implemented yet, so stages are rejected at validation."""
from __future__ import annotations

import torch
from torch.export import Dim

from . import register_adapter
from .base import Adapter, Domain, ExampleShape, batch_dim, random_token_ids


class _CausalLM(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@register_adapter
class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
    needs_seq_len = True

    def domains(self):
        return {"llm": Domain("llm", "hf.model.layers", self.config.num_hidden_layers, "hf.model.rotary_emb")}

    def layer_dims(self, domain):
        return self.config.hidden_size, self.config.intermediate_size, 3

    def wrap(self, model):
        return _CausalLM(model)

    def input_names(self):
        return ("input_ids", "attention_mask")

    def example_inputs(self, shape: ExampleShape, seed: int):
        gen = torch.Generator().manual_seed(seed)
        special = {self.config.pad_token_id, self.config.bos_token_id, self.config.eos_token_id}
        ids = random_token_ids((shape.batch, shape.seq_len), self.config.vocab_size, special, gen)
        return ids, torch.ones_like(ids)

    def dynamic_shapes(self, min_tokens):
        batch, seq = batch_dim(), Dim("seq", min=max(2, min_tokens), max=self.config.max_position_embeddings)
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
