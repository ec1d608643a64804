"""LazyLLM: progressive prefill pruning by the last token's attention (Apple, arXiv 2407.14057).

Paper: at chosen layers, score each token by the head-mean attention it receives from the last
token (the one predicting the next), keep the top share, and prune progressively (more kept early,
fewer later). No official code was found; the layer schedule and percentiles are the spec's sites
and budgets (the paper sweeps them). Revival through the aux cache at later decoding steps needs
`decode: {policy: dynamic}`, which prunec does not implement yet: with `static`, the prefill
selection holds for every generated token.
"""
from __future__ import annotations

from . import MethodInfo, register_method
from .lowerings import attention_row_scores
from .fastv import attention_received

register_method(MethodInfo(
    name="lazyllm",
    lower_scores=attention_row_scores,
    kernel=True,
    action="prune",
    kind="score",
    signals=("attention_qk",),
    fn=attention_received,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="keep_original",
    domains=("llm",),
    layer_sites_only=True,
    summary="last token's head-mean attention at each chosen layer, progressive (no revival yet)",
    source="LazyLLM paper (arXiv 2407.14057) §3; no official code found",
))
