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


def keep_list(candidates: list[int], kept_candidates: list[int], length: int) -> list[int]:
    cand = set(candidates)
    return sorted([p for p in range(length) if p not in cand] + kept_candidates)


def _gather_rows(x: torch.Tensor, keep: list[list[int]], dim: int) -> torch.Tensor:
    if x.shape[0] == 1 and len(keep) > 1:
        x = x.expand(len(keep), *x.shape[1:])
    return torch.stack([x[b].index_select(dim - 1, torch.tensor(k)) for b, k in enumerate(keep)])


class LlavaReference:
    """Runs an HF LLaVA (eager attention) with hooks applying DivPrune before the LLM and/or FastV
    after decoder layer i. `stages`: dicts with kind ('divprune' | 'fastv'), n_keep, and for fastv
    `layer`, `query` ('last' | 'all') and `positions` ('keep_original' | 'renumber')."""

    def __init__(self, model, stages: list[dict]):
        self.model, self.stages = model, stages
        model.set_attn_implementation("eager")

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask, pixel_values):
        lm = self.model.model.language_model
        image_id = self.model.config.image_token_id
        state = {"cands": [torch.nonzero(r == image_id).flatten().tolist() for r in input_ids],
                 "cur": None, "pending": None, "attn": None, "pos": None}
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

        def cut(stage):
            probs = state["attn"].float().mean(dim=1)  # [B, S, S], head mean
            keep, locals_per_row = [], []
            for b, cands in enumerate(state["cands"]):
                if stage["query"] == "last":
                    row = probs[b, -1]
                else:
                    row = probs[b].mean(dim=0)
                local = slow_topk([float(row[c]) for c in cands], stage["n_keep"])
                locals_per_row.append(local)
                keep.append(keep_list(cands, [cands[i] for i in local], probs.shape[-1]))
            keep_patches(locals_per_row)
            state["cands"] = [[k.index(c) for c in cands if c in k] for k, cands in zip(keep, state["cands"])]
            prev = state["cur"] or [list(range(probs.shape[-1])) for _ in keep]
            state["cur"] = [[p[i] for i in k] for p, k in zip(prev, keep)]
            state["pending"] = (keep, probs.shape[-1])
            # each row's rotary position per token: kept as they were, or renumbered 0..K-1
            positions = state["pos"] or [list(range(probs.shape[-1])) for _ in keep]
            if stage["positions"] == "renumber":
                state["pos"] = [list(range(len(k))) for k in keep]
            else:
                state["pos"] = [[p[i] for i in k] for p, k in zip(positions, keep)]

        def before_layer(index):
            def hook(module, args, kwargs):
                for stage in self.stages:
                    if stage["kind"] == "fastv" and stage["layer"] == index - 1:
                        cut(stage)
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
                return args, kwargs
            return hook

        def before_norm(module, args):
            for stage in self.stages:
                if stage["kind"] == "fastv" and stage["layer"] == len(lm.layers) - 1:
                    cut(stage)
            if state["pending"] is not None and args[0].shape[1] == state["pending"][1]:
                return (_gather_rows(args[0], state["pending"][0], 1),)
            return None

        try:
            if any(s["kind"] == "divprune" for s in self.stages):
                handles.append(lm.register_forward_pre_hook(pre_llm, with_kwargs=True))
            for stage in self.stages:
                if stage["kind"] == "fastv":
                    handles.append(lm.layers[stage["layer"]].self_attn.register_forward_hook(capture_attn))
            for i, layer in enumerate(lm.layers):
                handles.append(layer.register_forward_pre_hook(before_layer(i), with_kwargs=True))
            handles.append(lm.norm.register_forward_pre_hook(before_norm))
            return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              use_cache=False).logits
        finally:
            for h in handles:
                h.remove()


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
