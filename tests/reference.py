"""Independent eager references: the HF model itself, with forward hooks doing the selection.

Written from the methods' definitions with plain Python loops, sharing no code with prunec's ops or
passes, so a bug in the graph rewrite or an op cannot hide in both places.
"""
from __future__ import annotations

import torch


def slow_divprune(features: torch.Tensor, n_keep: int) -> list[int]:
    """DivPrune from its definition: distance 1 - cos; first pick maximises the distance to the
    nearest other token (second-smallest entry of its column, the smallest being itself); then
    greedily add the token farthest (by min distance) from the chosen set. Ties: lower index."""
    n = features.shape[0]
    f = features.double()
    dist = [[1.0 - float(torch.dot(f[i], f[j]) / (f[i].norm() * f[j].norm())) for j in range(n)]
            for i in range(n)]
    if n == 1:
        return [0]
    nearest = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nearest[j], -j))]
    while len(chosen) < n_keep:
        best = max((j for j in range(n) if j not in chosen),
                   key=lambda j: (min(dist[s][j] for s in chosen), -j))
        chosen.append(best)
    return sorted(chosen)


def slow_topk(scores: list[float], n_keep: int) -> list[int]:
    """Indices of the n_keep largest scores, ties to the lower index, returned sorted."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:n_keep])


def reference_stages(plan) -> list[dict]:
    """A plan's stages in the terms HookReference takes."""
    return [dict(kind=s.method, n_keep=s.n_keep, layer=s.layer, positions=s.positions, **s.param_dict)
            for s in plan.stages]


def keep_list(candidates: list[int], kept_candidates: list[int], length: int) -> list[int]:
    cand = set(candidates)
    return sorted([p for p in range(length) if p not in cand] + kept_candidates)


def _gather_rows(x: torch.Tensor, keep: list[list[int]], dim: int) -> torch.Tensor:
    if x.shape[0] == 1 and len(keep) > 1:
        x = x.expand(len(keep), *x.shape[1:])
    return torch.stack([x[b].index_select(dim - 1, torch.tensor(k)) for b, k in enumerate(keep)])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE from its definition: x*cos + rotate_half(x)*sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def pyramiddrop_last_row(layer, hidden, cos, sin, mask):
    """PyramidDrop's score from its definition: the *next* layer's norm, q/k projections and RoPE
    on the current hidden states; the last token's softmax row over all keys (under `mask`, [B, S]
    additive or bool row), mean over heads. Returns [B, S]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, seq, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(batch, seq, -1, hd).transpose(1, 2)
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    rows = []
    for b in range(batch):
        per_head = []
        for h in range(q.shape[1]):
            kh = k[b, h // (q.shape[1] // k.shape[1])]
            logits = (kh @ q[b, h, -1]) * hd ** -0.5
            row_mask = mask[b]
            logits = logits.masked_fill(~row_mask, float("-inf")) if row_mask.dtype == torch.bool else logits + row_mask
            per_head.append(torch.softmax(logits.double(), dim=0))
        rows.append(torch.stack(per_head).mean(dim=0))
    return torch.stack(rows)


class HookReference:
    """Runs an HF LLaVA or Llama (eager attention) with hooks applying DivPrune before the LLM and/or
    FastV / PyramidDrop after decoder layer i. Candidates: LLaVA's image tokens; for Llama every
    token but the last. `stages`: dicts with kind ('divprune' | 'fastv' | 'pyramiddrop'), n_keep, and
    for the others `layer`, `positions` ('keep_original' | 'renumber') and, for fastv, `query`
    ('last' | 'all')."""

    def __init__(self, model, stages: list[dict]):
        self.model, self.stages = model, stages
        model.set_attn_implementation("eager")
        self.is_llava = hasattr(model.model, "language_model")
        self.lm = model.model.language_model if self.is_llava else model.model

    def _candidates(self, input_ids):
        if self.is_llava:
            return [torch.nonzero(r == self.model.config.image_token_id).flatten().tolist() for r in input_ids]
        return [list(range(input_ids.shape[1] - 1)) for _ in input_ids]

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, pixel_values=None, cache=None):
        """Logits of the pruned forward. With a DynamicCache, each layer stores the K/V of the tokens
        it kept, `self.layer_masks[i]` is the 4-D mask layer i used, and `self.last_position[b]` is the
        rotary position row b's last token has in the last layer."""
        lm = self.lm
        self.layer_masks = {}
        state = {"cands": self._candidates(input_ids), "cur": None, "pending": None, "attn": None, "pos": None}
        state["patches"] = [list(range(len(c))) for c in state["cands"]]  # patch id of each candidate
        self.kept = []  # per stage: the set of patch ids row 0 still holds

        def keep_patches(locals_per_row):
            state["patches"] = [[p[i] for i in local] for p, local in zip(state["patches"], locals_per_row)]
            self.kept.append(set(state["patches"][0]))
        handles = []

        def pre_llm(module, args, kwargs):
            stage = next(s for s in self.stages if s["kind"] == "divprune")
            embeds, mask = kwargs["inputs_embeds"], kwargs["attention_mask"]
            keep, locals_per_row = [], []
            for b, cands in enumerate(state["cands"]):
                local = slow_divprune(embeds[b, cands], stage["n_keep"])
                locals_per_row.append(local)
                keep.append(keep_list(cands, [cands[i] for i in local], embeds.shape[1]))
            keep_patches(locals_per_row)
            state["cands"] = [[k.index(c) for c in cands if c in k] for k, cands in zip(keep, state["cands"])]
            kwargs["inputs_embeds"] = _gather_rows(embeds, keep, 1)
            kwargs["attention_mask"] = _gather_rows(mask, keep, 1)
            return args, kwargs

        def capture_attn(module, args, output):
            state["attn"] = output[1]

        def cut(stage, rows=None):
            """rows: [B, S] scores; by default FastV's, from the captured attention probabilities."""
            if rows is None:
                probs = state["attn"].float().mean(dim=1)  # [B, S, S], head mean
                rows = probs[:, -1] if stage["query"] == "last" else probs.mean(dim=1)
            keep, locals_per_row = [], []
            for b, cands in enumerate(state["cands"]):
                row = rows[b]
                local = slow_topk([float(row[c]) for c in cands], stage["n_keep"])
                locals_per_row.append(local)
                keep.append(keep_list(cands, [cands[i] for i in local], rows.shape[-1]))
            keep_patches(locals_per_row)
            state["cands"] = [[k.index(c) for c in cands if c in k] for k, cands in zip(keep, state["cands"])]
            prev = state["cur"] or [list(range(rows.shape[-1])) for _ in keep]
            state["cur"] = [[p[i] for i in k] for p, k in zip(prev, keep)]
            state["pending"] = (keep, rows.shape[-1])
            # each row's rotary position per token: kept as they were, or renumbered 0..K-1
            positions = state["pos"] or [list(range(rows.shape[-1])) for _ in keep]
            if stage["positions"] == "renumber":
                state["pos"] = [list(range(len(k))) for k in keep]
            else:
                state["pos"] = [[p[i] for i in k] for p, k in zip(positions, keep)]

        def before_layer(index):
            def hook(module, args, kwargs):
                for stage in self.stages:
                    if stage["kind"] == "fastv" and stage["layer"] == index - 1:
                        cut(stage)
                    if stage["kind"] == "pyramiddrop" and stage["layer"] == index - 1:
                        cut(stage, next_layer_rows(module, args[0] if args else kwargs["hidden_states"], kwargs))
                if state["pending"] is not None:
                    keep, length = state["pending"]
                    hidden = args[0] if args else kwargs["hidden_states"]
                    if hidden.shape[1] == length:
                        hidden = _gather_rows(hidden, keep, 1)
                        args = (hidden, *args[1:]) if args else args
                        if not args:
                            kwargs["hidden_states"] = hidden
                if state["cur"] is not None and "attention_mask" in kwargs:
                    cur = state["cur"]
                    mask = kwargs["attention_mask"]
                    kwargs["attention_mask"] = _gather_rows(_gather_rows(mask, cur, 2), cur, 3)
                    cos, sin = kwargs["position_embeddings"]  # rows = positions 0..S-1 of the LLM input
                    pos = state["pos"]
                    kwargs["position_embeddings"] = (_gather_rows(cos, pos, 1), _gather_rows(sin, pos, 1))
                    kwargs["position_ids"] = None
                self.layer_masks[index] = kwargs["attention_mask"]
                return args, kwargs
            return hook

        def current_view(kwargs):
            """The layer's 4-D mask and cos/sin, cut to the tokens the rows still hold."""
            mask = kwargs["attention_mask"]
            cos, sin = kwargs["position_embeddings"]
            if state["cur"] is None:
                return mask, cos, sin
            mask = _gather_rows(_gather_rows(mask, state["cur"], 2), state["cur"], 3)
            return mask, _gather_rows(cos, state["pos"], 1), _gather_rows(sin, state["pos"], 1)

        def next_layer_rows(layer, hidden, kwargs):
            mask, cos, sin = current_view(kwargs)
            if cos.shape[0] != hidden.shape[0]:
                cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
            return pyramiddrop_last_row(layer, hidden, cos, sin, mask[:, 0, -1])

        def before_norm(module, args):
            for stage in self.stages:
                if stage["kind"] == "fastv" and stage["layer"] == len(lm.layers) - 1:
                    cut(stage)
            if state["pending"] is not None and args[0].shape[1] == state["pending"][1]:
                return (_gather_rows(args[0], state["pending"][0], 1),)
            return None

        try:
            if any(s["kind"] == "divprune" and s["layer"] is None for s in self.stages):
                handles.append(lm.register_forward_pre_hook(pre_llm, with_kwargs=True))
            for stage in self.stages:
                if stage["kind"] == "fastv":
                    handles.append(lm.layers[stage["layer"]].self_attn.register_forward_hook(capture_attn))
            for i, layer in enumerate(lm.layers):
                handles.append(layer.register_forward_pre_hook(before_layer(i), with_kwargs=True))
            handles.append(lm.norm.register_forward_pre_hook(before_norm))
            images = {"pixel_values": pixel_values} if self.is_llava else {}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                use_cache=cache is not None, **images).logits
            length = self.layer_masks[0].shape[-1]  # tokens entering the LLM
            # which LLM-input tokens each row still holds at the end (for in-LLM cuts)
            self.final_tokens = state["cur"] or [list(range(length)) for _ in range(input_ids.shape[0])]
            self.last_position = ([p[-1] for p in state["pos"]] if state["pos"] is not None
                                  else [length - 1] * input_ids.shape[0])
            return logits
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, *, max_new_tokens: int):
        """Greedy decoding with HF's own DynamicCache: prune at prefill (static policy), then feed one
        token at a time through the decoder layers, each against the keys it kept, the new token at
        the position after the last token's final one. Returns (token ids [B, T], logits [B, T, V])."""
        from transformers import DynamicCache

        lm = self.lm
        cache = DynamicCache(config=self.model.config)
        logits = self(input_ids, attention_mask, pixel_values, cache=cache)[:, -1]
        # per layer: keys row b may attend (the last query's row of the mask the layer used)
        valid = {}
        for i, mask in self.layer_masks.items():
            row = mask[:, 0, -1]
            valid[i] = (row if row.dtype == torch.bool else row == 0).expand(input_ids.shape[0], -1)
        position = torch.tensor(self.last_position)[:, None] + 1
        tokens, scores = [], []
        for _ in range(max_new_tokens):
            scores.append(logits)
            token = logits.argmax(-1)
            tokens.append(token)
            valid = {i: torch.cat([v, torch.ones_like(v[:, :1])], dim=1) for i, v in valid.items()}
            embeds = lm.embed_tokens(token[:, None])
            cos_sin = lm.rotary_emb(embeds, position_ids=position)

            def per_layer(index):
                def hook(module, args, kwargs):
                    additive = torch.zeros(valid[index].shape, dtype=embeds.dtype)
                    additive[~valid[index]] = torch.finfo(embeds.dtype).min
                    kwargs["attention_mask"] = additive[:, None, None, :]
                    kwargs["position_embeddings"] = cos_sin
                    return args, kwargs
                return hook
            handles = [layer.register_forward_pre_hook(per_layer(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
            try:
                hidden = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
            finally:
                for h in handles:
                    h.remove()
            logits = self.model.lm_head(hidden)[:, -1]
            position = position + 1
        return torch.stack(tokens, dim=1), torch.stack(scores, dim=1)


class VisionReference:
    """HF vision encoder with a DivPrune cut after encoder layer `layer` (or on its output when
    layer is None), over the patch tokens ([CLS] and registers protected)."""

    def __init__(self, model, layers, layer: int | None, n_keep: int, leading: int, interpolate: bool):
        self.model, self.layers, self.layer, self.n_keep = model, layers, layer, n_keep
        self.leading, self.interpolate = leading, interpolate

    def _select(self, hidden):
        keep = []
        for b in range(hidden.shape[0]):
            cands = list(range(self.leading, hidden.shape[1]))
            local = slow_divprune(hidden[b, cands], self.n_keep)
            keep.append(keep_list(cands, [cands[i] for i in local], hidden.shape[1]))
        return _gather_rows(hidden, keep, 1)

    @torch.no_grad()
    def __call__(self, pixel_values):
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        if self.layer is None:
            return self._select(self.model(pixel_values=pixel_values, **extra).last_hidden_state)
        handle = self.layers[self.layer].register_forward_hook(lambda m, a, out: self._select(out))
        try:
            return self.model(pixel_values=pixel_values, **extra).last_hidden_state
        finally:
            handle.remove()
