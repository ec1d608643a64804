"""Spec v1: load (safe YAML, `extends`) and validate (JSON Schema); `semantics.resolve` then checks
it against the model and resolves it into an immutable plan of stages with budgets in counts.

Three layers, each reporting file:line:col and the JSON pointer of the offending value:
1. YAML: plain types only, no duplicate keys, bounded size and aliases (`yaml_loader`).
2. Schema: Draft 2020-12, unknown keys rejected (`schema.spec_schema`).
3. Semantics: the model exists, the site exists for its family, the layer is in range, the budget
   fits the tokens available at that site, the method can get its signals there.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from .errors import Location, SpecError, SpecErrors
from .schema import spec_schema
from .yaml_loader import PositionedDoc, escape_pointer_token, load_yaml

_ONE_CHOICE = re.compile(r"^/pipeline/\d+/keep$")
_METHOD_POINTER = re.compile(r"^/pipeline/\d+/method$")
_MODEL_SOURCES = {"builtin", "path", "config", "zoo"}


@dataclass(frozen=True)
class Stage:
    """One pruning stage at one site, after list sites are expanded and budgets resolved."""

    pointer: str                  # JSON pointer of the spec entry it came from
    site: str                     # canonical site, e.g. "llm.layers[2]" or "projector.output"
    domain: str
    layer: int | None             # None for output sites
    method: str
    action: str
    params: tuple[tuple[str, Any], ...]
    positions: str
    protect: tuple[str, ...]
    keep_spec: tuple[str, float]  # ("count", 8) or ("ratio", 0.5), as written
    n_candidates: int = 0         # candidates per row entering the stage
    n_keep: int = 0               # candidates per row kept
    query_tokens: int = 0         # image-scoped methods: the query (last) image's candidates entering the stage
    rounding: str = "half_up"     # ratio -> count: the stage's `rounding:`, else its method's official rule
    keep_of: str = "input"        # a ratio counts from the original candidates (input) or those reaching (stage)
    ragged: bool = False          # resolved per row at run time (inputs.images_per_row); counts above are the example's
    keep_clamps: tuple[int, int] = (0, -1)  # run-time ratio budgets: (min, max kept; -1 = none)
    scope: str = "all"            # "per_image": the selection runs within each image (equal budgets)

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class Spec:
    """A loaded, schema-valid spec with `extends` applied. Not yet checked against a model."""

    path: Path
    doc: PositionedDoc
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def locate(self, pointer: str) -> Location:
        return self.doc.locate(pointer)


@dataclass(frozen=True)
class Plan:
    """A spec checked against its model: the adapter, the model config and the resolved stages."""

    spec: Spec
    adapter: Any
    stages: tuple[Stage, ...]
    lock: dict[str, Any] = field(hash=False)

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.lock).encode()).hexdigest()


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Layer 1 + extends


def _read(path: Path, chain: tuple[Path, ...], at: Location | None) -> PositionedDoc:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise SpecError(f"circular extends: {cycle}", at)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist", at) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"cannot read spec {str(path)!r}: {exc}", at) from None
    doc = load_yaml(text, str(path))
    if not isinstance(doc.data, dict):
        raise SpecError("a spec must be a YAML mapping", doc.locate(""))
    return doc


def _merge(base: Any, over: Any, pointer: str, base_locs: dict, over_locs: dict, out_locs: dict,
           doc: PositionedDoc) -> Any:
    """Deep-merge `over` onto `base`: mappings merge, lists and scalars replace, null deletes.
    Two mappings are one choice each and so replace rather than merge: a stage's `keep` (count or
    ratio), and the model's source (`builtin` / `path` / `config` / `zoo`)."""
    if isinstance(base, dict) and isinstance(over, dict) and not _ONE_CHOICE.match(pointer):
        merged = dict(base)
        if pointer == "/model" and _MODEL_SOURCES & set(over):
            merged = {k: v for k, v in merged.items() if k not in _MODEL_SOURCES}
        for key, value in over.items():
            child = f"{pointer}/{escape_pointer_token(key)}"
            if value is None:
                merged.pop(key, None)
            elif key in base:
                merged[key] = _merge(base[key], value, child, base_locs, over_locs, out_locs, doc)
            else:
                merged[key] = value
                _copy_locs(over_locs, child, child, out_locs)
        return merged
    _copy_locs(over_locs, pointer, pointer, out_locs)
    return over


def _copy_locs(src: dict, src_prefix: str, dst_prefix: str, out: dict) -> None:
    for ptr, loc in src.items():
        if ptr == src_prefix or ptr.startswith(src_prefix + "/"):
            out[dst_prefix + ptr[len(src_prefix):]] = loc


def _patch_pipeline_by_id(base: list, patches: dict, doc: PositionedDoc, out_locs: dict) -> list:
    """A child's `pipeline:` mapping {stage id: overrides} patches the base's stages by id."""
    stages = copy.deepcopy(base)
    ids = {stage.get("id"): i for i, stage in enumerate(stages) if isinstance(stage, dict)}
    for stage_id, override in patches.items():
        ptr = f"/pipeline/{escape_pointer_token(stage_id)}"
        if stage_id not in ids:
            known = ", ".join(sorted(k for k in ids if k)) or "none"
            raise SpecError(f"no stage with id {stage_id!r} in the base spec (ids: {known})",
                            doc.locate_key(ptr))
        index = ids[stage_id]
        target = f"/pipeline/{index}"
        child_locs: dict = {}
        _copy_locs(doc.locations, ptr, target, child_locs)
        stages[index] = _merge(stages[index], override, target, {}, child_locs, out_locs, doc)
    return stages


def _load_merged(path: Path, chain: tuple[Path, ...] = (), at: Location | None = None
                 ) -> tuple[dict, dict[str, Location], PositionedDoc]:
    doc = _read(path, chain, at)
    data = doc.data
    if "extends" not in data:
        return data, dict(doc.locations), doc
    extends = data["extends"]
    if not isinstance(extends, str):
        raise SpecError("`extends` must be a path string", doc.locate("/extends"))
    if "\0" in extends:
        raise SpecError("`extends` must be a path without NUL characters", doc.locate("/extends"))
    base_data, base_locs, _ = _load_merged((path.parent / extends).resolve(), (*chain, path),
                                           doc.locate("/extends"))
    out_locs = dict(base_locs)
    over = {k: v for k, v in data.items() if k != "extends"}
    if isinstance(over.get("pipeline"), dict) and isinstance(base_data.get("pipeline"), list):
        over["pipeline"] = _patch_pipeline_by_id(base_data["pipeline"], over["pipeline"], doc, out_locs)
        merged = _merge({k: v for k, v in base_data.items() if k != "pipeline"},
                        {k: v for k, v in over.items() if k != "pipeline"}, "", base_locs, doc.locations,
                        out_locs, doc)
        merged["pipeline"] = over["pipeline"]
    else:
        merged = _merge(base_data, over, "", base_locs, doc.locations, out_locs, doc)
    out_locs[""] = doc.locations[""]
    return merged, out_locs, doc


# --------------------------------------------------------------------------------------------
# Layer 2


# JSON Schema counts 2.0 as an integer; a spec that says `seq_len: 2.0` means a float, so refuse it.
_STRICT_INTEGERS = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)),
)


def _schema_errors(data: dict, doc: PositionedDoc, schema: dict) -> list[SpecError]:
    validator = _STRICT_INTEGERS(schema)
    errors = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(_schema_error(err, doc))
    return errors


def _pointer(parts) -> str:
    return "".join(f"/{escape_pointer_token(p)}" for p in parts)


def _schema_error(err: jsonschema.ValidationError, doc: PositionedDoc) -> SpecError:
    pointer = _pointer(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        key_ptr = f"{pointer}/{escape_pointer_token(extra[0])}" if extra else pointer
        return SpecError(f"unknown key {extra[0]!r}; expected one of: {allowed}" if extra else err.message,
                         doc.locate_key(key_ptr))
    if err.validator == "oneOf" and pointer == "/model":
        return SpecError("expected exactly one of `builtin`, `path`, `config` or `zoo`", doc.locate(pointer))
    if err.validator in ("oneOf", "anyOf") and err.context:
        # Report the branch that got furthest, which names the real problem.
        best = max(err.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
        if best.validator != "required":
            return _schema_error(best, doc)
    if err.validator == "enum" and _METHOD_POINTER.match(pointer) and isinstance(err.instance, str):
        close = difflib.get_close_matches(err.instance, err.schema["enum"], n=1)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return SpecError(f"unknown method {err.instance!r}; {hint}`prunec methods` lists all "
                         f"{len(err.schema['enum'])}", doc.locate(pointer))
    expected = _expected(err)
    return SpecError(f"{expected}, got {json.dumps(err.instance)[:80]}" if expected else err.message,
                     doc.locate(pointer))


def _pattern_words() -> dict[str, str]:
    from .schema import NAME_PATTERN, SITE_PATTERN

    return {SITE_PATTERN: "expected a site: llm.layers[i] (after 0-indexed layer i; -1 is the last), a list "
                          "llm.layers[i, j], vision.layers[i], encoder.layers[i], projector.output or vision.output",
            NAME_PATTERN: "expected a name of letters, digits, '.', '_' or '-' (at most 100, starting with a "
                          "letter or digit)"}


def _expected(err: jsonschema.ValidationError) -> str:
    v, s = err.validator, err.schema
    if v == "type":
        return f"expected {s['type']}"
    if v == "enum":
        return "expected one of: " + ", ".join(map(str, s["enum"]))
    if v == "const":
        return f"expected {s['const']!r}"
    if v == "pattern":
        return _pattern_words().get(s["pattern"], f"expected a string matching {s['pattern']}")
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"expected a number {word} {s[v]}"
    if v == "required":
        return ""
    if v in ("minProperties", "oneOf") and "count" in s.get("properties", {}):
        return "expected exactly one of `count` or `ratio`"
    if v == "dependentRequired":
        return "`of`, `min` and `max` apply to a ratio budget"
    if v == "uniqueItems":
        return "expected unique items"
    if v == "minItems":
        return f"expected at least {s['minItems']} items"
    return ""


def load_spec(path: str | Path) -> Spec:
    """Load a spec file: safe YAML, `extends` resolved, JSON Schema checked. Raises SpecError(s)."""
    path = Path(path).resolve()
    data, locations, doc = _load_merged(path)
    merged_doc = PositionedDoc(data, locations, doc.key_locations, str(path))
    errors = _schema_errors(data, merged_doc, spec_schema())
    if isinstance(data.get("pipeline"), dict):
        errors.append(SpecError("a `pipeline:` mapping (patch by stage id) needs `extends:`",
                                 merged_doc.locate("/pipeline")))
    if errors:
        raise errors[0] if len(errors) == 1 else SpecErrors(errors)
    return Spec(path, merged_doc, data)


def load_spec_source(source: str | Path | dict, model_given: bool = False) -> Spec:
    """A spec from a file path, YAML text or a dict (`prunec.compile`). Text and dicts are read as
    a file in a temporary directory; a relative `extends:` in them is relative to the current
    directory. With `model_given`, a spec may leave out `model:` (the caller supplies the model)."""
    import tempfile

    import yaml

    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        return load_spec(source)
    if isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, str):
        data = yaml.safe_load(source)
        if not isinstance(data, dict):
            raise SpecError("a spec given as text must be a YAML mapping (or pass a file path ending in .yaml)")
    else:
        raise SpecError(f"a spec is a file path, YAML text or a dict, not {type(source).__name__}")
    changed = False
    if isinstance(data.get("extends"), str) and not Path(data["extends"]).is_absolute():
        data["extends"], changed = str(Path(data["extends"]).resolve()), True
    if model_given and "model" not in data:
        from .semantics import PROVIDED_CONFIG

        data["model"], changed = {"config": PROVIDED_CONFIG}, True
    text = source if isinstance(source, str) and not changed else yaml.safe_dump(data, sort_keys=False)
    with tempfile.TemporaryDirectory(prefix="prunec-spec-") as folder:
        path = Path(folder) / "spec.yaml"
        path.write_text(text)
        return load_spec(path)
