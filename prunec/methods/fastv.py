"""FastV: keep the image tokens that receive the most attention at layer K (ECCV 2024).

Official code (pkunlp-icler/FastV, `LlamaModel.forward`): after the K-th decoder layer, take that
layer's attention probabilities, average over heads, read the row of the *last* query token, and
keep the top (1-R) share of the image columns; original RoPE positions are kept.
The paper instead averages the attention each token receives over *all* queries: `query: all`.

In prunec the site `llm.layers[i]` is "after 0-indexed decoder layer i", so the official
"K = 2" is `llm.layers[1]`.
"""
from __future__ import annotations

from ..attention import attention_received
from . import MethodInfo, register_method
from .lowerings import attention_row_scores


register_method(MethodInfo(
    row_budgets=True,
    name="fastv",
    lower_scores=attention_row_scores,
    kernel=True,
    eager_way="attention_probabilities",
    rounding="half_even",
    rounding_source="LightCompress / HF-port FastV: round(N * (1 - rate))",
    action="prune",
    kind="score",
    signals=("attention_qk",),
    fn=attention_received,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "query": {"enum": ["last", "all"],
                      "description": "last = official code (last token's row); all = paper (mean over queries)"},
        },
    },
    defaults={"query": "last"},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="attention received at the site layer (last query, head mean); top-k of image tokens",
    source="pkunlp-icler/FastV src/transformers/.../modeling_llama.py::LlamaModel.forward",
    variants={"query": "last (code) / all (paper)"},
))
