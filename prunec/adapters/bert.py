"""BERT encoders. Captured and emitted; text-token pruning is not implemented yet, so stages are
rejected at validation."""
from __future__ import annotations

import torch
from torch.export import Dim

from . import register_adapter
from .base import Adapter, Domain, ExampleShape, batch_dim, random_token_ids


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@register_adapter
class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    needs_seq_len = True

    def domains(self):
        return {"encoder": Domain("encoder", "hf.encoder.layer", self.config.num_hidden_layers, None)}

    def wrap(self, model):
        return _Encoder(model)

    def input_names(self):
        return ("input_ids", "attention_mask")

    def example_inputs(self, shape: ExampleShape, seed: int):
        gen = torch.Generator().manual_seed(seed)
        special = {self.config.pad_token_id}
        ids = random_token_ids((shape.batch, shape.seq_len), self.config.vocab_size, special, gen)
        return ids, torch.ones_like(ids)

    def dynamic_shapes(self, min_tokens):
        batch, seq = batch_dim(), Dim("seq", min=max(2, min_tokens), max=self.config.max_position_embeddings)
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
