"""Llama-style causal LMs (Llama, SmolLM): text-token pruning inside the decoder.

Candidates are every token but the last (`protect: [last]`, always): the last token is the one
whose logits continue the text. Padding counts as a candidate (attention-based scores give it zero,
so it goes first). Budgets resolve against the spec's `seq_len`, so an artifact with stages runs at
that length: left-pad prompts to it.
"""
from __future__ import annotations

import torch

import prunec.ops  # noqa: F401  (torch.ops.prunec.prefix_mask)

from . import register_adapter
from .base import LLAMA_SUB_BLOCKS, Domain, TextAdapter, last_logits, llama_attention_dims


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
    span = "text"
    protectable = ("last",)
    sub_blocks = LLAMA_SUB_BLOCKS

    def domains(self):
        return {"llm": Domain("llm", "hf.model.layers", self.config.num_hidden_layers, "hf.model.rotary_emb",
                              "hf.model.norm")}

    def layer_dims(self, domain):
        return self.config.hidden_size, self.config.intermediate_size, 3

    def candidate_mask(self, graph, site_value, protect, cut):
        with graph.inserting_after(cut):
            return graph.call_function(torch.ops.prunec.prefix_mask.default, (site_value, 1))

    def initial_candidates_from_config(self, inputs, protect):
        return inputs["seq_len"] - 1

    def decoder(self, model):
        return model.model, model.lm_head

    def attention_dims(self, domain):
        return llama_attention_dims(self.config)

    def wrap(self, model, output=None):
        return _CausalLM(model, last_logits(output))
