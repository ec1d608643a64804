"""Layer 3 of spec validation: semantics against the model. Resolves a schema-valid Spec into a
Plan: the adapter, and stages with site lists expanded and budgets turned into counts."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import jsonschema
import yaml

from .errors import BuildError, SpecError
from .schedule import method_rounding, ratio_count
from .spec import Plan, Spec, Stage, _pointer, _schema_error
from .yaml_loader import PositionedDoc

DEFAULT_INPUTS = {"batch": 2, "seed": 0}
DEFAULT_MODEL = {"seed": 0, "dtype": "float32", "attn_implementation": "sdpa"}
_DOMAIN_ORDER = {"vision": 0, "llm": 1, "encoder": 1}  # a VLM runs its vision tower first
_LAYER_SITE = re.compile(r"^(llm|vision|encoder)\.layers\[([-\d,\s]+)\]$")



def parse_site(site: str) -> list[tuple[str, int | None]]:
    """'llm.layers[2, 8]' -> [('llm', 2), ('llm', 8)]; 'projector.output' -> [('projector.output', None)]."""
    match = _LAYER_SITE.match(site.strip())
    if not match:
        return [(site.strip(), None)]
    return [(match.group(1), int(i)) for i in match.group(2).split(",")]


def _budget_values(keep: dict, n_sites: int, pointer: str, spec: Spec) -> list[tuple[str, Any]]:
    kind = "count" if "count" in keep else "ratio"
    value = keep[kind]
    if isinstance(value, list):
        if len(value) != n_sites:
            raise SpecError(f"expected {n_sites} budgets (one per layer in the site list), got {len(value)}",
                            spec.locate(f"{pointer}/keep/{kind}"))
        return [(kind, v) for v in value]
    return [(kind, value)] * n_sites


def resolve_count(kind: str, value: Any, original: int, rounding: str) -> int:
    """Candidates kept: a count as written, or ratio x original candidates under `rounding`."""
    return int(value) if kind == "count" else ratio_count(value, original, rounding)


def resolve(spec: Spec, model=None) -> Plan:
    """Check the spec against its model and resolve budgets into counts. With `model` (a loaded HF
    model, `prunec.compile`), the spec's `model:` is replaced by it: its config decides, and the
    lock names the `model-config.json` the artifact then carries."""
    model_src, config, adapter = _check_model(spec) if model is None else _provided_model(spec, model)
    inputs = _check_inputs(spec, adapter, config)
    if spec.data.get("output", {}).get("logits") == "last" and not adapter.generates:
        raise SpecError(f"output.logits: last applies to causal LMs; family {adapter.family} returns hidden states",
                        spec.locate("/output/logits"))
    pooling = spec.data.get("output", {}).get("pooling", "none")
    if pooling != "none" and pooling not in adapter.poolings:
        raise SpecError(f"output.pooling: family {adapter.family} offers "
                        f"{', '.join(adapter.poolings) or 'no pooling'}, not {pooling}", spec.locate("/output/pooling"))
    if "decode" in spec.data:
        if not adapter.generates:
            raise SpecError(f"decode applies to causal LMs; family {adapter.family} does not generate",
                            spec.doc.locate_key("/decode"))
        if spec.data["decode"].get("policy", "static") == "dynamic":
            raise SpecError("decode policy 'dynamic' (re-selection during decoding, with revival) is not "
                            "implemented yet; use static", spec.locate("/decode/policy"))
    stages = _resolve_stages(spec, adapter, model_src, inputs)
    unprotected = next((s for s in stages if "cls" not in s.protect), None)
    if pooling == "cls" and unprotected:
        raise SpecError("output.pooling: cls returns the [CLS] vector, which this stage may prune; keep `cls` in "
                        "its protect", spec.locate(f"{unprotected.pointer}/protect"))
    if "budget" in spec.data:
        stages = _fit_budget(spec, adapter, inputs, stages)
    if spec.data.get("backend") == "triton":
        _check_kernels(spec, stages)
    return Plan(spec, adapter, stages, _lock(spec.data, model_src, inputs, list(stages), spec))


def _check_method_budget(spec: Spec, ptr: str, kind: str, info, params: dict, adapter, protect, available: int,
                         n_keep: int, images: int) -> None:
    """A method's own budget rule (`MethodInfo.check_budget`), reported at the budget or the site."""
    if info.check_budget is None:
        return
    problem = info.check_budget(params, available, n_keep, adapter, protect, images)
    if problem:
        message, where = problem
        raise SpecError(message, spec.locate(f"{ptr}/keep/{kind}" if where == "keep" else f"{ptr}/site"))


def _fit_budget(spec: Spec, adapter, inputs: dict, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """The stages rescaled to `budget.layer_average` (prunec/budget.py)."""
    from . import flops
    from .budget import achievable, fit_layer_average

    from .methods import get_method

    target, ptr = spec.data["budget"]["layer_average"], "/budget/layer_average"
    if inputs.get("images", 1) > 1 and any(get_method(s.method).scope or get_method(s.method).per_image
                                           or s.scope == "per_image" for s in stages):
        raise SpecError("a layer-averaged budget scales whole-row counts; it does not apply to per-image or "
                        "image-scoped stages (write their counts)", spec.locate(ptr))
    domains = sorted({s.domain for s in stages})
    if len(domains) != 1:
        raise SpecError("a layer-averaged budget needs stages in exactly one domain; this pipeline prunes "
                        f"{', '.join(domains) or 'nothing'}", spec.locate(ptr))

    def average(candidate: tuple[Stage, ...]) -> float:
        return flops.layer_average_candidates(Plan(spec, adapter, candidate, {"inputs": inputs}))[domains[0]]

    low, high = achievable(stages, average)
    if not low <= target <= high:
        raise SpecError(f"expected a layer average in {low:g}..{high:g} ({domains[0]} candidates per layer this "
                        f"schedule can keep), got {target:g}", spec.locate(ptr))
    fitted = fit_layer_average(stages, target, average)
    for written, stage in zip(stages, fitted):
        _check_method_budget(spec, stage.pointer, written.keep_spec[0], get_method(stage.method), stage.param_dict,
                             adapter, stage.protect, stage.n_candidates, stage.n_keep, inputs.get("images", 1))
    return fitted


def _check_kernels(spec: Spec, stages) -> None:
    """backend: triton promises every stage's scoring and selection runs as a Triton kernel."""
    from .kernels import kernel_gaps

    gaps = sorted({gap for stage in stages for gap in kernel_gaps(stage.method, stage.param_dict)})
    if gaps:
        raise SpecError(f"backend 'triton': no Triton kernel for {', '.join(gaps)} (kernels exist for attention-row "
                        "scores, TTV, top-k, DivPrune and ToMe); use auto (kernels where they exist) or torch",
                        spec.locate("/backend"))


def _check_model(spec: Spec):
    from . import models
    from .adapters import adapter_for

    model_src = {**DEFAULT_MODEL, **spec.data["model"]}
    for key in ("path", "config"):
        if key in model_src and not (spec.base_dir / model_src[key]).exists():
            raise SpecError(f"model {key} {model_src[key]!r} does not exist (relative to the spec)",
                            spec.locate(f"/model/{key}"))
    try:
        config = models.model_config(model_src, spec.base_dir)
        adapter = adapter_for(config)
    except (KeyError, OSError, ValueError, ImportError, BuildError) as exc:
        raise SpecError(f"cannot use this model: {exc}", spec.locate("/model")) from None
    if "family" in model_src and model_src["family"] != adapter.family:
        raise SpecError(f"model is family {adapter.family!r} (model_type {config.model_type!r}), "
                        f"not {model_src['family']!r}", spec.locate("/model/family"))
    return model_src, config, adapter


PROVIDED_CONFIG = "model-config.json"  # beside the lock in an artifact compiled from a model object


def _provided_model(spec: Spec, model):
    from .adapters import adapter_for

    config = getattr(model, "config", None)
    if config is None:
        raise BuildError(f"prunec.compile takes a Hugging Face model (with .config), not {type(model).__name__}")
    try:
        adapter = adapter_for(config)
    except (KeyError, ValueError) as exc:
        raise BuildError(f"cannot use this model: {exc}") from None
    parameter = next(iter(model.parameters()), None)
    dtype = str(parameter.dtype).removeprefix("torch.") if parameter is not None else "float32"
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    return {"config": PROVIDED_CONFIG, "dtype": dtype, "attn_implementation": attn}, config, adapter


def _check_inputs(spec: Spec, adapter, config) -> dict[str, Any]:
    inputs = {**DEFAULT_INPUTS, **spec.data.get("inputs", {})}
    if adapter.needs_seq_len and "seq_len" not in inputs:
        raise SpecError(f"family {adapter.family} needs `inputs.seq_len` (example sequence length)",
                        spec.doc.locate_key("/inputs"))
    if adapter.needs_seq_len:
        low, high = adapter.seq_len_range()
        if not low <= inputs["seq_len"] <= high:
            raise SpecError(f"expected a sequence length in {low}..{high} for this model, got {inputs['seq_len']}",
                            spec.locate("/inputs/seq_len"))
    if "images" in inputs and "projector.output" not in adapter.output_sites:
        raise SpecError(f"family {adapter.family} takes no images in its token sequence",
                        spec.locate("/inputs/images"))
    if "images_per_row" in inputs:
        bounds = inputs["images_per_row"]
        if "projector.output" not in adapter.output_sites:
            raise SpecError(f"family {adapter.family} takes no images in its token sequence",
                            spec.locate("/inputs/images_per_row"))
        if not bounds["min"] <= inputs.get("images", 1) <= bounds["max"]:
            raise SpecError(f"expected min <= inputs.images ({inputs.get('images', 1)}) <= max, got "
                            f"{bounds['min']}..{bounds['max']}", spec.locate("/inputs/images_per_row"))
    if "budget" in spec.data and adapter.candidates_vary(inputs):
        raise SpecError("budget: a layer-averaged budget needs one candidate count; here rows hold different "
                        "counts (image sizes or inputs.images_per_row)", spec.doc.locate_key("/budget"))
    if inputs.get("images", 1) > 1:
        per_image = adapter.initial_candidates_from_config({}, ())
        needed = inputs["images"] * (per_image + 1) + 1
        if inputs["seq_len"] < needed:
            raise SpecError(f"expected a sequence length of at least {needed} for {inputs['images']} images of "
                            f"{per_image} tokens (each followed by text), got {inputs['seq_len']}",
                            spec.locate("/inputs/seq_len"))
    if adapter.needs_image:
        inputs.setdefault("image_size", adapter.default_image_size())
        patch = getattr(getattr(config, "vision_config", config), "patch_size", 1)
        if inputs["image_size"] % patch or not patch <= inputs["image_size"] <= 128 * patch:
            raise SpecError(f"expected a multiple of the patch size {patch} in {patch}..{128 * patch}",
                            spec.locate("/inputs/image_size"))
    return inputs


def _check_entry(spec: Spec, adapter, raw: dict, ptr: str):
    """A pipeline entry's method, action, parameters (defaults filled) and protected spans."""
    from .methods import get_method

    info = get_method(raw["method"])
    action = raw.get("action", info.action)
    if action != info.action:
        raise SpecError(f"method {info.name!r} is a {info.action} method, not {action}", spec.locate(f"{ptr}/action"))
    _check_params(spec, info, raw.get("params", {}), f"{ptr}/params")
    if info.kind == "fusion":
        _check_terms(spec, raw["params"]["terms"], f"{ptr}/params/terms")
    protect = tuple(raw.get("protect", adapter.protectable))
    for index, item in enumerate(protect):
        if item not in adapter.protectable:
            raise SpecError(f"family {adapter.family} cannot protect {item!r}; expected one of: "
                            f"{', '.join(adapter.protectable)}", spec.locate(f"{ptr}/protect/{index}"))
    return info, action, {**info.defaults, **raw.get("params", {})}, protect


def _check_params(spec: Spec, info, params: dict, ptr: str) -> None:
    for err in jsonschema.Draft202012Validator(info.params_schema).iter_errors(params):
        sub = _schema_error(err, PositionedDoc(None, {}, {}, spec.doc.file))
        where = f"{ptr}{sub.location.pointer if sub.location else _pointer(err.absolute_path)}"
        # an unknown key is reported at the key, like unknown keys elsewhere in the spec
        locate = spec.doc.locate_key if err.validator == "additionalProperties" else spec.locate
        raise SpecError(f"params of {info.name}: {sub.message}", locate(where))


def _check_terms(spec: Spec, items: list, ptr: str) -> None:
    """Each fused term names a registered score (or a select method with a score form), once."""
    from .methods import get_method, method_names

    seen = set()
    for j, term in enumerate(items):
        at = f"{ptr}/{j}"
        try:
            info = get_method(term["method"])
        except KeyError:
            raise SpecError(f"unknown method {term['method']!r}; expected one of: "
                            f"{', '.join(n for n in method_names() if get_method(n).kind != 'fusion')}", spec.locate(f"{at}/method")) from None
        if info.kind == "fusion" or info.lower_scores is None:
            raise SpecError(f"method {info.name!r} has no score a fusion can take", spec.locate(f"{at}/method"))
        if info.action != "prune":
            raise SpecError(f"method {info.name!r} merges tokens; a fusion takes prune scores only", spec.locate(f"{at}/method"))
        if info.scope:
            raise SpecError(f"method {info.name!r} scores one image scope ({info.scope}); a fusion cannot take it",
                            spec.locate(f"{at}/method"))
        if info.name in seen:
            raise SpecError(f"method {info.name!r} appears twice in terms", spec.locate(f"{at}/method"))
        seen.add(info.name)
        _check_params(spec, info, term.get("params", {}), f"{at}/params")


def _fused(info, params: dict):
    """(method, its params) of each score the stage computes (the method itself unless it fuses)."""
    from .methods import get_method, terms

    return [(get_method(name), term_params) for name, term_params, _ in terms(info.name, params)]


def _locate(spec: Spec, adapter, info, where: str, layer: int | None, site_ptr: str):
    """(domain, canonical site, rank within the domain) of one expanded site, or a SpecError."""
    domains = adapter.domains()
    if layer is None:
        if where not in adapter.output_sites:
            raise SpecError(_site_help(adapter, domains, f"site {where!r}"), spec.locate(site_ptr))
        domain = adapter.output_sites[where]
        if info.layer_sites_only:
            raise SpecError(f"method {info.name} reads a layer's signals, so it needs a "
                            f"`{domain}.layers[i]` site, not {where}", spec.locate(site_ptr))
        rank = -1 if where == "projector.output" else domains[domain].num_layers + 1
        return domain, where, rank
    if where not in domains:
        raise SpecError(_site_help(adapter, domains, f"site domain {where!r}"), spec.locate(site_ptr))
    n_layers = domains[where].num_layers
    if not -n_layers <= layer < n_layers:
        raise SpecError(f"layer {layer} is out of range: {where} has {n_layers} layers "
                        f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end; sites are 0-indexed)",
                        spec.locate(site_ptr))
    layer %= n_layers
    if layer == n_layers - 1 and adapter.generates:
        # a decoder's last layer feeds only the LM head: a cut there saves nothing and drops output
        # positions (an encoder's last-layer cut shortens the output sequence, which is its use)
        raise SpecError(f"layer {layer} is the last of {where}'s {n_layers} layers: no layer runs after it, so "
                        f"pruning there saves nothing; the last useful site is {where}.layers[{layer - 1}]",
                        spec.locate(site_ptr))
    return where, f"{where}.layers[{layer}]", layer


@dataclass(frozen=True)
class _ImageLayout:
    """What the compiler knows statically of the images in a row: their count, each one's tokens
    while all are equal, and the query (last) image's tokens, or None once a stage makes them
    data-dependent (a selection over several images at once)."""

    count: int
    per_image: int | None
    query: int | None
    original_per_image: int

    @classmethod
    def initial(cls, candidates: int, count: int) -> "_ImageLayout":
        return cls(count, candidates // count, candidates // count, candidates // count)

    def out_of_scope(self, scope: str | None, available: int) -> int:
        """Candidates a stage of this scope leaves alone."""
        if scope == "context":
            return self.query
        return available - self.query if scope == "query" else 0

    def scope_original(self, scope: str | None, original: int) -> int:
        """What a ratio budget counts from: the scope's original tokens."""
        if scope == "context":
            return self.original_per_image * (self.count - 1)
        return self.original_per_image if scope == "query" else original

    def scope_words(self, scope: str | None) -> str:
        return f" in the {'context images' if scope == 'context' else 'query image'}" if scope else ""

    def after(self, info, per_image: bool, n_keep: int, out_of_scope: int) -> "_ImageLayout":
        if self.count == 1:
            return replace(self, per_image=n_keep, query=n_keep)
        if info.scope == "context":
            return replace(self, per_image=None)
        if info.scope == "query":
            return replace(self, per_image=None, query=n_keep - out_of_scope)
        if per_image:
            return replace(self, per_image=n_keep // self.count, query=n_keep // self.count)
        return replace(self, per_image=None, query=None)


def _check_images(spec: Spec, info, per_image: bool, layout: _ImageLayout, layer: int | None, ptr: str,
                  ragged: bool) -> None:
    """A stage over several images per row gets what its method needs of them."""
    if info.scope and layout.count < 2:
        raise SpecError(f"method {info.name} prunes the {info.scope} image tokens of a multi-image row; set "
                        "`inputs.images` to 2 or more (demonstrations + a query)", spec.locate(f"{ptr}/method"))
    if info.scope and layout.query is None:
        raise SpecError(f"method {info.name} needs the query image's token count, which an earlier stage selecting "
                        "over several images at once makes data-dependent", spec.locate(f"{ptr}/method"))
    if per_image and layout.count > 1 and layout.per_image is None:
        raise SpecError(f"{_per_image_words(info)} selects within each image, and an earlier stage left the images "
                        "with different token counts", spec.locate(f"{ptr}/method"))
    vision_signals = {"cls_attention", "layer_attention"} & set(info.signals)
    if ragged and vision_signals == {"cls_attention"}:
        return  # its [CLS] rows are placed on each row's image tokens in order (`Adapter.patch_scores`)
    if layout.count > 1 and layer is None and vision_signals:
        raise SpecError(f"method {info.name} reads the vision tower per image, which prunec supports with one "
                        f"image per row (inputs.images is {layout.count})", spec.locate(f"{ptr}/method"))


def _scope_written(stage: Stage) -> bool:
    """A scope other than the method's own (what a lock must write to rebuild the same stage)."""
    from .methods import get_method

    return stage.scope != ("per_image" if get_method(stage.method).per_image else "all")


def _per_image_words(info) -> str:
    return f"method {info.name}" if info.per_image else f"a `scope: per_image` stage of {info.name}"


def _stage_scope(spec: Spec, info, raw: dict, ragged: bool, ptr: str) -> str:
    """The stage's `scope:`, checked against what its method's selection can do."""
    from .methods import takes_per_image_scope

    scope = raw.get("scope", "per_image" if info.per_image else "all")
    where = spec.locate(f"{ptr}/scope")
    if scope == "all" and info.per_image:
        raise SpecError(f"method {info.name} selects within each image; scope: all is not available for it", where)
    if scope == "per_image" and not takes_per_image_scope(info):
        raise SpecError(f"method {info.name} selects over its whole candidate set (it has no per-image selection); "
                        "scope: per_image is not available for it", where)
    if scope == "per_image" and ragged and not info.per_image:
        raise SpecError("scope: per_image with rows of different image counts (inputs.images_per_row) is not "
                        "implemented yet; use scope: all", where)
    return scope


def _check_attention_before_cut(spec: Spec, info, params: dict, layer: int | None, previous: int | None,
                                ptr: str) -> None:
    """A method comparing several layers' attention maps needs them over one token set."""
    if layer is None or previous is None or info.accumulates or info.attention_layers is None:
        return
    crossed = [i for i in info.attention_layers(params, layer) if i <= previous]
    if crossed:
        raise SpecError(f"method {info.name} reads layer {crossed[0]}'s attention, which saw the tokens before the "
                        f"earlier stage's cut after layer {previous}; move one of the two stages",
                        spec.locate(f"{ptr}/site"))


def _resolve_stages(spec: Spec, adapter, model_src: dict, inputs: dict) -> tuple[Stage, ...]:
    stages: list[Stage] = []
    kept: dict[str, tuple[int, tuple[str, ...]]] = {}  # domain -> (candidates after latest stage, protect)
    images: dict[str, _ImageLayout] = {}  # domain -> what is known of each image's tokens
    cut_after: dict[str, int | None] = {}  # domain -> layer of its latest stage
    previous: tuple[tuple[int, int], str] | None = None
    for i, raw in enumerate(spec.data["pipeline"]):
        ptr, site_ptr = f"/pipeline/{i}", f"/pipeline/{i}/site"
        info, action, params, protect = _check_entry(spec, adapter, raw, ptr)
        sites = parse_site(raw["site"])
        for (where, layer), (kind, value) in zip(sites, _budget_values(raw["keep"], len(sites), ptr, spec)):
            for scorer, scorer_params in _fused(info, params):
                domain, site, rank = _locate(spec, adapter, scorer, where, layer, site_ptr)
                _check_signals(spec, adapter, scorer, scorer_params, domain, site, layer, model_src, ptr)
            positions = raw.get("positions", info.default_positions)
            if layer is None and positions == "keep_original" and adapter.domains()[domain].rotary_path:
                raise SpecError(f"positions: keep_original is not available at {where}: the LLM numbers "
                                "positions for the sequence it receives; use renumber", spec.locate(f"{ptr}/positions"))
            if domain in kept and kept[domain][1] != protect:
                raise SpecError("every stage in one domain must protect the same tokens", spec.locate(f"{ptr}/protect"))
            original = adapter.initial_candidates_from_config(inputs, protect)
            available = kept.get(domain, (original, protect))[0]
            layout = images.get(domain, _ImageLayout.initial(original, inputs.get("images", 1)))
            ragged = adapter.candidates_vary(inputs) and domain in adapter.image_domains
            scope = _stage_scope(spec, info, raw, ragged, ptr)
            per_image = scope == "per_image"
            _check_images(spec, info, per_image, layout, layer, ptr, ragged)
            _check_produced(spec, info, params, domain, stages, ptr)
            out_of_scope = layout.out_of_scope(info.scope, available)
            rounding = raw.get("rounding") or method_rounding(info.name, params)
            of = raw["keep"].get("of", "input")
            base = available - out_of_scope if of == "stage" else layout.scope_original(info.scope, original)
            if info.kept_count is not None:  # the count the official code realises for this budget
                n_keep = info.kept_count(params, value if kind == "count" else value * base) + out_of_scope
            elif per_image and kind == "ratio" and layout.count > 1:  # each image keeps its own ratio
                n_keep = layout.count * resolve_count(kind, value, base // layout.count, rounding)
            else:
                n_keep = resolve_count(kind, value, base, rounding) + out_of_scope
            if n_keep > available:
                reach = available - out_of_scope
                fits = (f"count: {reach}" if kind == "count" else
                        f"ratio: {math.floor(reach / base * 10**4) / 10**4:g} (of the original {base}), or a ratio "
                        "with `of: stage` (of those reaching the stage)")
                raise SpecError(f"budget keeps {n_keep - out_of_scope} tokens but only {reach} candidates reach "
                                f"{site}{layout.scope_words(info.scope)}; at most {fits}",
                                spec.locate(f"{ptr}/keep/{kind}"))
            if per_image and layout.count > 1 and n_keep % layout.count:
                raise SpecError(f"{_per_image_words(info)} keeps the same count in each of the {layout.count} images; "
                                f"{n_keep} is not a multiple", spec.locate(f"{ptr}/keep/{kind}"))
            if n_keep - out_of_scope < 1 and kind == "ratio":
                raise SpecError(f"ratio {value} keeps 0 of {original} candidates; write `count: 0` to drop them all",
                                spec.locate(f"{ptr}/keep/{kind}"))
            if n_keep < 1 and info.action == "merge":
                raise SpecError("a merge keeps at least one token; use a prune method with `count: 0`",
                                spec.locate(f"{ptr}/keep/{kind}"))
            _check_method_budget(spec, ptr, kind, info, params, adapter, protect, available, n_keep,
                                 inputs.get("images", 1))
            clamps = (raw["keep"].get("min", 0), raw["keep"].get("max", -1))
            _check_ragged(spec, info, ragged, clamps, raw["keep"], ptr, layer, positions)
            _check_attention_before_cut(spec, info, params, layer, cut_after.get(domain), ptr)
            key = (_DOMAIN_ORDER.get(domain, 1), rank)
            if previous and key <= previous[0]:
                raise SpecError(f"site {site} does not come after {previous[1]}; stages must follow the "
                                "model's order and name each site once", spec.locate(site_ptr))
            previous = (key, site)
            kept[domain] = (n_keep, protect)
            images[domain] = layout.after(info, per_image, n_keep, out_of_scope)
            cut_after[domain] = layer
            stages.append(Stage(ptr, site, domain, layer, info.name, action, tuple(sorted(params.items())),
                                positions, protect, (kind, value), available, n_keep,
                                layout.query if info.scope else 0, rounding, of, ragged, clamps, scope))
    return tuple(stages)


def _check_ragged(spec: Spec, info, ragged: bool, clamps: tuple[int, int], keep: dict, ptr: str,
                  layer: int | None, positions: str) -> None:
    """Run-time budgets: clamps need them; per-image and image-scoped methods need one count per image."""
    if not ragged:
        if "min" in keep or "max" in keep:
            word = "min" if "min" in keep else "max"
            raise SpecError(f"keep.{word} clamps a ratio resolved per row at run time; these inputs have one "
                            "candidate count (declare inputs.images_per_row)", spec.locate(f"{ptr}/keep/{word}"))
        return
    if clamps[1] >= 0 and clamps[0] > clamps[1]:
        raise SpecError(f"keep.min ({clamps[0]}) is above keep.max ({clamps[1]})", spec.locate(f"{ptr}/keep/min"))
    if layer is not None and positions == "renumber" and "decode" in spec.data:
        raise SpecError("positions: renumber at a layer site with ragged rows and decode: is not implemented yet "
                        "(each row's positions would shift by a different amount before and after the cut, and the "
                        "decode step gives one position to all layers); use keep_original, or build without decode",
                        spec.locate(f"{ptr}/positions"))
    if not info.row_budgets:
        raise SpecError(f"method {info.name} resolves its budget at build time, for one candidate count; "
                        "here rows hold different counts (image sizes or inputs.images_per_row; methods with "
                        "run-time budgets: `prunec methods`)", spec.locate(f"{ptr}/method"))


def _check_produced(spec: Spec, info, params: dict, domain: str, stages: list[Stage], ptr: str) -> None:
    """Signals that only a stage of another method produces (`MethodInfo.produces`) need one earlier."""
    from .methods import get_method, method_names

    for term, _ in _fused(info, params):
        for signal in term.signals:
            producers = [n for n in method_names() if signal in get_method(n).produces]
            if producers and not any(s.domain == domain and signal in get_method(s.method).produces for s in stages):
                raise SpecError(f"method {term.name} reads {signal}, which a stage of {' or '.join(producers)} "
                                "computes; add one earlier in the pipeline", spec.locate(f"{ptr}/method"))


def _check_signals(spec: Spec, adapter, info, params: dict, domain: str, site: str, layer: int | None,
                   model_src: dict, ptr: str) -> None:
    """The method can get its signals at this site of this model."""
    from .adapters.base import Adapter
    from .methods import QK_SIGNALS
    from .signals import signal_names

    site_ptr = f"{ptr}/site"
    missing = [s for s in info.signals if s not in signal_names()]
    if missing:
        raise SpecError(f"method {info.name} needs signal {missing[0]!r}, which no provider offers (signals: "
                        f"{', '.join(signal_names())})", spec.locate(f"{ptr}/method"))
    if domain not in info.domains:
        raise SpecError(f"method {info.name} works in {', '.join(info.domains)} sites, not {domain}",
                        spec.locate(site_ptr))
    if layer is not None and info.layer_domains is not None and domain not in info.layer_domains:
        raise SpecError(f"method {info.name} works at {', '.join(info.layer_domains)} layer sites or before the "
                        f"LLM ({', '.join(adapter.output_sites) or 'none here'}), not {site}", spec.locate(site_ptr))
    signals = set(info.signals)
    if QK_SIGNALS & signals and model_src["attn_implementation"] != "sdpa":
        raise SpecError(f"method {info.name} reads q/k from an sdpa call; set "
                        "model.attn_implementation: sdpa", spec.locate(f"{ptr}/method"))
    if "cls_attention" in signals:
        if layer is not None and "cls" not in adapter.protectable:
            raise SpecError(f"method {info.name} scores with a [CLS] row, and family {adapter.family}'s "
                            f"{domain} layers have no [CLS]; use a pre-LLM site such as "
                            f"{', '.join(adapter.output_sites) or 'none'}", spec.locate(site_ptr))
        if layer is None and type(adapter).vision_attention is Adapter.vision_attention:
            raise SpecError(f"method {info.name} needs a [CLS] attention row; at {site} family {adapter.family} "
                            f"has none (use a `{domain}.layers[i]` site)", spec.locate(site_ptr))
    if "text_raters" in signals and "projector.output" not in adapter.output_sites:
        raise SpecError(f"method {info.name} rates image tokens by text, and family {adapter.family} has no image "
                        "tokens", spec.locate(site_ptr))
    if "layer_attention" in signals and layer is None:
        if type(adapter).vision_attention is Adapter.vision_attention:
            raise SpecError(f"method {info.name} reads vision attention maps; family {adapter.family} has no "
                            f"vision tower before {site}", spec.locate(site_ptr))
        n_vision = adapter.config.vision_config.num_hidden_layers
        for needed in info.attention_layers(params, adapter.vision_feature_layer()):
            if not 0 <= needed < n_vision:
                raise SpecError(f"method {info.name} reads vision layer {needed}; the vision tower has layers "
                                f"0..{n_vision - 1}", spec.locate(f"{ptr}/params"))
    if "layer_attention" in signals and layer is not None and info.attention_layers is not None:
        for needed in info.attention_layers(params, layer):
            if not 0 <= needed <= layer:
                raise SpecError(f"method {info.name} reads layer {needed}'s attention; at {site} that must be "
                                f"0..{layer}", spec.locate(f"{ptr}/params"))
    if "transitions" in signals or info.accumulates:
        if "transitions" in signals and not adapter.sub_blocks:
            raise SpecError(f"method {info.name} reads sub-block inputs/outputs, which family {adapter.family} "
                            "does not describe", spec.locate(f"{ptr}/method"))
        first = params.get("accumulate_from")
        if first is not None and first > layer:
            raise SpecError(f"accumulate_from {first} comes after the site layer {layer}", spec.locate(f"{ptr}/params"))


def _site_help(adapter, domains, what: str) -> str:
    sites = [f"{d}.layers[0..{info.num_layers - 1}]" for d, info in domains.items()] + list(adapter.output_sites)
    return f"{what} does not exist for family {adapter.family}; available sites: {', '.join(sites)}"


def _lock(data: dict, model_src: dict, inputs: dict, stages: list[Stage], spec: Spec) -> dict:
    """The fully resolved spec: extends applied, defaults explicit, site lists expanded. A lock is
    itself a valid spec and rebuilds the same artifact."""
    model = dict(model_src)
    for key in ("path", "config"):
        if key in model and model[key] != PROVIDED_CONFIG:
            model[key] = str((spec.base_dir / model[key]).resolve())
    lock = {
        "prunec": 1,
        "name": data["name"],
        "description": data.get("description", ""),
        "model": model,
        "inputs": inputs,
        "pipeline": [
            {"site": s.site, "action": s.action, "method": s.method, "params": s.param_dict,
             "keep": {s.keep_spec[0]: s.keep_spec[1], **({"of": "stage"} if s.keep_of == "stage" else {}),
                      **({"min": s.keep_clamps[0]} if s.keep_clamps[0] else {}),
                      **({"max": s.keep_clamps[1]} if s.keep_clamps[1] >= 0 else {})},
             "rounding": s.rounding, "positions": s.positions,
             "protect": list(s.protect), **({"scope": s.scope} if _scope_written(s) else {})}
            for s in stages
        ],
        "backend": data.get("backend", "auto"),
    }
    if "source" in data:
        lock["source"] = data["source"]
    if "output" in data:
        lock["output"] = data["output"]
    if "decode" in data:
        lock["decode"] = {"policy": "static", **data["decode"]}
    return lock


def dump_lock(lock: dict) -> str:
    header = "# prunec spec.lock.yaml: the resolved spec this artifact was built from (a valid spec)\n"
    return header + yaml.safe_dump(lock, sort_keys=False, default_flow_style=False, allow_unicode=True)
