"""Human-readable summaries of a plan: the stage table of `prunec explain` and `prunec build`."""
from __future__ import annotations

import inspect

from .flops import estimate, layer_tokens, segments
from .methods import get_method
from .ragged import RowBudget
from .schedule import stage_tokens
from .spec import Plan


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_table(plan: Plan) -> str:
    inputs = plan.lock["inputs"]
    flops = estimate(plan)
    segs = segments(plan)
    rows = [["#", "site", "method", "positions", "tokens in -> out", "candidates kept", "FLOPs share"]]
    for i, t in enumerate(stage_tokens(plan)):
        stage = t.stage
        after_macs = sum(s.macs for s in segs if _governing_stage(plan, s) is stage)
        share = after_macs / flops["baseline_macs"] if flops["baseline_macs"] else 0.0
        per_image = stage.scope == "per_image" and inputs.get("images", 1) > 1
        method = f"{stage.method} (per image)" if per_image else stage.method
        rows.append([str(i), stage.site, method, stage.positions, f"{t.tokens_in} -> {t.tokens_out}",
                     f"{t.candidates_kept}/{t.candidates_in}", f"{share:6.1%}"])
    text = [f"{plan.spec.name}: {plan.adapter.family} model, example inputs {_shape(inputs)}"]
    if plan.stages:
        text.append(_table(rows))
    else:
        text.append("(no stages: the emitted module computes exactly what the model computes)")
    layers = [["segment", "layers", "tokens", "share of unpruned FLOPs"]]
    for s in segs:
        share = s.macs / flops["baseline_macs"] if flops["baseline_macs"] else 0.0
        layers.append([s.domain, f"{s.first_layer}-{s.last_layer}", str(s.tokens), f"{share:6.1%}"])
    text.append(_table(layers))
    text.append(flow_chart(plan))
    for s in plan.stages:
        rule = get_method(s.method).kept_count
        if rule is not None:
            text.append(f"{s.site} {s.method}: a budget of {s.keep_spec[0]} {s.keep_spec[1]:g} keeps {s.n_keep} "
                        f"candidates, as the official code counts: {inspect.getdoc(rule).splitlines()[0]}")
    ragged = [s for s in plan.stages if s.ragged]
    if ragged:
        bounds = inputs.get("images_per_row")
        why = f"rows hold {bounds['min']}..{bounds['max']} images" if bounds else "image sizes set the token counts"
        text.append(f"{why}, so the counts above hold at the example inputs only; each row keeps, per stage:")
        text.extend(f"  {s.site} {s.method}: {RowBudget.of_stage(s).formula()}"
                    f"{' of the candidates reaching it' if s.keep_of == 'stage' else ' of its input candidates'}"
                    for s in ragged)
    if plan.stages:
        averages = ", ".join(f"{domain} {value:g}" for domain, value in flops["layer_average_candidates"].items())
        text.append(f"{plan.adapter.span} tokens per layer, averaged over the layers (the layer-averaged "
                    f"budget in-LLM papers report): {averages}; per-stage counts in the table above")
    text.append(f"prefill FLOPs: {flops['ratio']:.1%} of unpruned; FLOPs share = the layers a stage's "
                f"output feeds, as a share of the unpruned total ({flops['convention']})")
    text.append(flops_table(flops))
    return "\n".join(text)


def flops_table(flops: dict) -> str:
    """Every accounting convention side by side, each named."""
    rows = [["FLOPs view", "tokens counted", "FFN term", "pruned / unpruned"]]
    names = {"full": "full sequence (a)", "image": "image tokens only (b)"}
    for view in flops["paper_style"]:
        rows.append(["paper style (MACs)", names[view["tokens"]], view["ffn"], f"{view['ratio']:.1%}"])
    exact = flops["exact"]
    rows.append(["exact prefill (FLOPs)", "full sequence + unpruned parts", "model's", f"{exact['prefill_flops']['ratio']:.1%}"])
    if "decode" in exact:
        rows.append([f"exact decode, {exact['decode']['new_tokens']} new tokens", "KV cache each layer kept",
                     "model's", f"{exact['decode']['ratio']:.1%}"])
        rows.append(["KV cache entries", "summed over layers", "-", f"{exact['kv_cache_tokens']['ratio']:.1%}"])
    return _table(rows) + f"\nexact: {exact['convention']}"


def flow_chart(plan: Plan, width: int = 40) -> str:
    """Tokens per layer as bars: '#' candidate (image/patch) tokens, '.' the others."""
    layers = layer_tokens(plan)
    most = max(total for total, _ in layers)
    domain = next(iter(plan.adapter.domains()))
    lines = [f"token flow per {domain} layer ('#' {plan.adapter.span} tokens, '.' other tokens):"]
    for i, (total, candidates) in enumerate(layers):
        bar_total = round(width * total / most)
        bar_cand = round(width * candidates / most)
        lines.append(f"  {i:>3} {'#' * bar_cand}{'.' * (bar_total - bar_cand)} {total}")
    return "\n".join(lines)


def _governing_stage(plan: Plan, segment):
    """The last stage whose output the segment's layers run on (None: they see the full input)."""
    found = None
    for stage in plan.stages:
        if stage.domain == segment.domain and (stage.layer is None or stage.layer < segment.first_layer):
            found = stage
    return found


def _shape(inputs: dict) -> str:
    parts = [f"batch {inputs['batch']}"]
    if "seq_len" in inputs:
        parts.append(f"seq_len {inputs['seq_len']}")
    if "image_size" in inputs:
        parts.append(f"image {inputs['image_size']}px")
    if inputs.get("images", 1) > 1 or "images_per_row" in inputs:
        parts.append(f"{inputs.get('images', 1)} images per row")
    return ", ".join(parts)


def size_table(plan: Plan, sizes: list[tuple[int, int]]) -> str:
    """Per image size (one image per row): its image tokens and candidates, and what each stage keeps
    of them by its per-row budget."""
    from .errors import PrunecError

    protect = plan.stages[0].protect if plan.stages else plan.adapter.protectable
    if plan.adapter.tokens_for_image((1, 1), protect) is None:
        raise PrunecError(f"--image-size: family {plan.adapter.family} takes one image size (inputs.image_size); "
                          "the option applies to families whose token count follows the image size (llava_next)")
    header = ["image (h x w)", "image tokens", "candidates", *(f"{s.site} {s.method} keeps" for s in plan.stages),
              "tokens dropped per row"]
    rows = [header]
    for height, width in sizes:
        tokens, candidates = plan.adapter.tokens_for_image((height, width), protect)
        reaching, kept = candidates, []
        for stage in plan.stages:
            budget = RowBudget.of_stage(stage)
            reaching = budget.kept(reaching if stage.keep_of == "stage" else candidates, reaching)
            kept.append(str(reaching))
        rows.append([f"{height} x {width}", str(tokens), str(candidates), *kept, str(candidates - reaching)])
    return _table(rows)
