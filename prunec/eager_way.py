"""The way token-pruning forks run today, as the baseline `prunec bench` measures prunec against.

FastV, SparseVLM and their descendants switch the LLM to eager attention and call it with
`output_attentions=True` (so every layer materialises and returns its attention probabilities),
read the probabilities of the scoring layer, and cut the sequence inside the decoder loop. Here that loop is the HF model's own, and the cut is made by
forward hooks; the selection itself is prunec's (same ops, same tie-breaking), so the two ways keep
the same tokens and differ only in how they get there. LLaVA only.
"""
from __future__ import annotations

import torch

import prunec.ops  # noqa: F401  (torch.ops.prunec)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .spec import Plan

_OPS = torch.ops.prunec


def _way(stage) -> str | None:
    """How the eager way scores a stage (`MethodInfo.eager_way`): from the layer's materialised
    probabilities, from the next layer's recomputed rows, or by the method's selection before the LLM."""
    from .methods import get_method

    return get_method(stage.method).eager_way


def unsupported_reason(plan: Plan) -> str | None:
    if plan.adapter.family != "llava":
        return f"the eager-attention way is implemented for LLaVA, not {plan.adapter.family}"
    methods = {s.method for s in plan.stages if _way(s) is None
               or (_way(s) == "select_before_llm") != (s.layer is None)}
    if methods:
        return f"the eager-attention way has no hooks for {', '.join(sorted(methods))}"
    return None


class EagerWay:
    """`EagerWay(model, plan)(input_ids, attention_mask, pixel_values)` -> logits like the emitted
    module's. Switches `model` to eager attention."""

    def __init__(self, model, plan: Plan):
        reason = unsupported_reason(plan)
        if reason:
            raise ValueError(reason)
        self.model, self.plan = model, plan
        self.last_logits = plan.lock.get("output", {}).get("logits") == "last"
        model.set_attn_implementation("eager")

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, pixel_values):
        lm = self.model.model.language_model
        state = _CutState(input_ids == self.model.config.image_token_id)
        handles = []
        stages = {s.layer: s for s in self.plan.stages if s.layer is not None}
        pre_llm = [s for s in self.plan.stages if s.layer is None]

        def before_llm(module, args, kwargs):
            stage = pre_llm[0]
            index = _select_before_llm(stage, kwargs["inputs_embeds"], state.candidates)
            kwargs["inputs_embeds"] = _OPS.gather_tokens(kwargs["inputs_embeds"], index, [1])
            kwargs["attention_mask"] = _OPS.gather_tokens(kwargs["attention_mask"], index, [1])
            state.candidates = _OPS.gather_tokens(state.candidates, index, [1])
            return args, kwargs

        def keep_attention(module, args, output):
            state.attention = output[1]  # [B, H, S, S] probabilities: why the forks need eager attention

        def before_layer(index):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                stage = stages.get(index - 1)
                if stage is not None:
                    scores = self._scores(stage, state, module, hidden, kwargs)
                    hidden = state.cut(stage, scores, hidden)
                    args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                return args, state.view(kwargs)
            return hook

        def before_norm(module, args):
            stage = stages.get(len(lm.layers) - 1)
            if stage is None:
                return None
            return (state.cut(stage, _probability_scores(stage, state), args[0]),)

        try:
            if pre_llm:
                handles.append(lm.register_forward_pre_hook(before_llm, with_kwargs=True))
            for layer, stage in stages.items():
                if _way(stage) == "attention_probabilities":
                    handles.append(lm.layers[layer].self_attn.register_forward_hook(keep_attention))
            for i, layer in enumerate(lm.layers):
                handles.append(layer.register_forward_pre_hook(before_layer(i), with_kwargs=True))
            handles.append(lm.norm.register_forward_pre_hook(before_norm))
            # output_attentions=True, as the forks call it: every layer's probabilities are returned
            return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              use_cache=False, output_attentions=True, logits_to_keep=int(self.last_logits)).logits
        finally:
            for handle in handles:
                handle.remove()

    def _scores(self, stage, state, layer, hidden, kwargs):
        if _way(stage) == "attention_probabilities":
            return _probability_scores(stage, state)
        # next_layer_rows (PyramidDrop's official scoring): the next layer's q (last token) and k on the
        # current hidden states
        attn = layer.self_attn
        current = state.view(kwargs)
        mask, (cos, sin) = current["attention_mask"], current["position_embeddings"]
        x = layer.input_layernorm(hidden)
        batch, seq, _ = x.shape
        q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        return _OPS.attention_received(q, k, mask, attn.scaling, False, "last")


def _probability_scores(stage, state):
    probs = state.attention.float().mean(dim=1)  # head mean
    return probs[:, -1] if stage.param_dict["query"] == "last" else probs.mean(dim=1)


def _select_before_llm(stage, embeds, candidates):
    """The stage method's own selection on the LLM input, as the emitted module runs it."""
    from .candidates import candidate_positions, candidate_rows, keep_indices
    from .methods import get_method

    positions = candidate_positions(candidates, stage.n_candidates)
    local = get_method(stage.method).fn(candidate_rows(embeds, positions), stage.n_keep, **dict(stage.params))
    return keep_indices(candidates, positions, local)


class _CutState:
    """Which original tokens each row still holds (`current`), their rotary positions, the candidates."""

    def __init__(self, candidates: torch.Tensor):
        self.candidates = candidates
        self.current = self.positions = None  # None until the first in-LLM cut
        self.attention = None

    def cut(self, stage, scores, hidden):
        index = _OPS.select_topk(scores, self.candidates, stage.n_candidates, stage.n_keep)
        self.candidates = _OPS.gather_tokens(self.candidates, index, [1])
        start = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        current = start if self.current is None else self.current
        positions = start if self.positions is None else self.positions
        self.current = current.gather(1, index)
        self.positions = (torch.arange(index.shape[1], device=index.device).expand(index.shape[0], -1)
                          if stage.positions == "renumber" else positions.gather(1, index))
        return _OPS.gather_tokens(hidden, index, [1])

    def view(self, kwargs):
        """A layer's kwargs cut to the rows' current tokens: 4-D mask rows/columns, cos/sin by position."""
        if self.current is None:
            return kwargs
        out = dict(kwargs)
        out["attention_mask"] = _OPS.gather_tokens(kwargs["attention_mask"], self.current, [2, 3])
        cos, sin = kwargs["position_embeddings"]
        out["position_embeddings"] = (_OPS.gather_tokens(cos, self.positions, [1]),
                                      _OPS.gather_tokens(sin, self.positions, [1]))
        out["position_ids"] = None
        return out
