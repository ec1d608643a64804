"""BERT encoders: text-token pruning between encoder layers, optionally pooled to one vector.

Candidates are every token after [CLS] (protected by default; `protect: []` makes it one too).
Padding counts as a candidate: attention-map scores give it nothing (no query attends to a masked
key), so it goes first, and whatever padding a stage keeps stays masked, because the attention mask
is gathered with the tokens. `output: {pooling: mean}` (sentence-transformers' mean over real
tokens) or `cls` returns one vector per row; the mean then runs over the kept real tokens, the
attention mask being gathered to them like every other token-axis tensor.
"""
from __future__ import annotations

import torch

import prunec.ops  # noqa: F401  (torch.ops.prunec.span_mask)

from . import register_adapter
from .base import Domain, TextAdapter


class _Encoder(torch.nn.Module):
    def __init__(self, model, pooling: str):
        super().__init__()
        self.hf, self.pooling = model, pooling

    def forward(self, input_ids, attention_mask):
        hidden = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
        return hidden


@register_adapter
class BertAdapter(TextAdapter):
    family = "bert"
    model_types = ("bert",)
    span = "text"
    protectable = ("cls",)
    poolings = ("none", "mean", "cls")

    def domains(self):
        return {"encoder": Domain("encoder", "hf.encoder.layer", self.config.num_hidden_layers, None)}

    def wrap(self, model, output=None):
        return _Encoder(model, (output or {}).get("pooling", "none"))

    def candidate_mask(self, graph, site_value, protect, cut):
        with graph.inserting_after(cut):
            return graph.call_function(torch.ops.prunec.span_mask.default, (site_value, int("cls" in protect)))

    def initial_candidates_from_config(self, inputs, protect):
        return inputs["seq_len"] - int("cls" in protect)
