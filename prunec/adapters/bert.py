"""BERT encoders. Captured and emitted; text-token pruning is not implemented yet, so stages are
rejected at validation."""
from __future__ import annotations

import torch

from . import register_adapter
from .base import Domain, TextAdapter


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@register_adapter
class BertAdapter(TextAdapter):
    family = "bert"
    model_types = ("bert",)

    def domains(self):
        return {"encoder": Domain("encoder", "hf.encoder.layer", self.config.num_hidden_layers, None)}

    def wrap(self, model, last_logits=False):
        return _Encoder(model)
