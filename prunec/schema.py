"""The JSON Schema (Draft 2020-12) of spec v1, built from the method and model registries so the
schema, the docs and the code cannot drift apart. `prunec schema` prints it."""
from __future__ import annotations

from typing import Any

from .methods import method_names
from .models import BUILTIN_CONFIGS
from .zoo import entries as zoo_entries

SPEC_VERSION = 1
SITE_PATTERN = r"^(?:(?:llm|vision|encoder)\.layers\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*\]|projector\.output|vision\.output)$"
MAX_SEED = 2**32 - 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def _one_or_list(item: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [item, {"type": "array", "items": item, "minItems": 1}]}


def spec_schema() -> dict[str, Any]:
    from .adapters import families

    ratio = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    count = {"type": "integer", "minimum": 0}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:prunec:spec:v1",
        "title": "prunec pipeline spec, version 1",
        "type": "object",
        "additionalProperties": False,
        "required": ["prunec", "name", "model", "pipeline"],
        "properties": {
            "prunec": {"const": SPEC_VERSION, "description": "spec format version"},
            "extends": {"type": "string", "description": "base spec path, relative to this file"},
            "name": {"type": "string", "pattern": NAME_PATTERN,
                     "description": "artifact name: letters, digits, '.', '_', '-'"},
            "description": {"type": "string"},
            "source": {
                "type": "object",
                "additionalProperties": False,
                "description": "where the strategy comes from: the paper, the official file it follows",
                "properties": {"paper": {"type": "string"}, "code": {"type": "string"}, "notes": {"type": "string"}},
            },
            "model": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "builtin": {"enum": sorted(BUILTIN_CONFIGS)},
                    "path": {"type": "string", "description": "local from_pretrained directory"},
                    "zoo": {"enum": sorted(zoo_entries()), "description": "offline model zoo entry (`prunec zoo list`), prepared on first use"},
                    "config": {"type": "string", "description": "config.json; weights are seeded random"},
                    "family": {"enum": families()},
                    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                    "dtype": {"enum": ["float32", "float16", "bfloat16"]},
                    "attn_implementation": {"enum": ["sdpa", "eager"]},
                },
                "oneOf": [{"required": ["builtin"]}, {"required": ["path"]}, {"required": ["config"]},
                          {"required": ["zoo"]}],
            },
            "inputs": {
                "type": "object",
                "additionalProperties": False,
                "description": "example shapes for capture; budgets resolve against them",
                "properties": {
                    "batch": {"type": "integer", "minimum": 1, "maximum": 4096},
                    "seq_len": {"type": "integer", "minimum": 2, "maximum": 1 << 20},
                    "image_size": {"type": "integer", "minimum": 1, "maximum": 1 << 14},
                    "images": {"type": "integer", "minimum": 1, "maximum": 64,
                               "description": "images per row (multimodal families), each its own span of "
                                              "image tokens: e.g. in-context demonstrations plus a query"},
                    "images_per_row": {
                        "type": "object", "additionalProperties": False, "required": ["min", "max"],
                        "properties": {"min": {"type": "integer", "minimum": 1, "maximum": 64},
                                       "max": {"type": "integer", "minimum": 1, "maximum": 64}},
                        "description": "rows may hold any number of images in [min, max], so any number of image "
                                       "tokens: ratio budgets are then resolved per row when the model runs, and "
                                       "rows of one batch keep different numbers of tokens"},
                    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                },
            },
            "pipeline": {
                "description": "ordered stages; a list, or (with extends) a mapping of stage id -> overrides",
                "oneOf": [
                    {"type": "array", "items": {"$ref": "#/$defs/stage"}},
                    {"type": "object", "additionalProperties": {"type": "object"}},
                ],
            },
            "output": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "dir": {"type": "string"},
                    "logits": {"enum": ["all", "last"],
                               "description": "causal LMs: logits for every kept token (all, default) or only "
                                              "the last one, as generation needs (last)"},
                    "pooling": {"enum": ["none", "mean", "cls"],
                                "description": "encoders: per-token hidden states (none, default), their mean "
                                               "over the kept real tokens (mean), or the [CLS] vector (cls)"},
                },
            },
            "backend": {"enum": ["auto", "torch", "triton"]},
            "budget": {
                "description": "scale every stage's budget by one factor so the pruned domain keeps this many "
                               "candidates per layer on average (the in-LLM papers' \"keep N\"); the written "
                               "budgets give the schedule's shape",
                "type": "object",
                "additionalProperties": False,
                "required": ["layer_average"],
                "properties": {"layer_average": {"type": "number", "exclusiveMinimum": 0}},
            },
            "decode": {
                "description": "causal LMs: also emit prefill + decode-step programs for generation",
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "policy": {"enum": ["static", "dynamic"],
                               "description": "static (default): prune once at prefill, generated tokens are "
                                              "never pruned; dynamic (LazyLLM-style re-selection): not yet"},
                },
            },
        },
        "$defs": {
            "stage": {
                "type": "object",
                "additionalProperties": False,
                "required": ["site", "method", "keep"],
                "properties": {
                    "id": {"type": "string", "pattern": NAME_PATTERN},
                    "site": {"type": "string", "pattern": SITE_PATTERN,
                             "description": "llm.layers[i] = after 0-indexed decoder layer i; lists expand"},
                    "action": {"enum": ["prune", "merge"]},
                    "method": {"enum": method_names()},
                    "params": {"type": "object"},
                    "keep": {
                        "type": "object",
                        "additionalProperties": False,
                        "minProperties": 1,
                        "properties": {"count": _one_or_list(count), "ratio": _one_or_list(ratio),
                                       "of": {"enum": ["input", "stage"],
                                              "description": "what a ratio counts from: the model's original "
                                                             "candidates (input, the default) or those reaching "
                                                             "this stage (stage)"},
                                       "min": {"type": "integer", "minimum": 0,
                                               "description": "run-time ratio budgets: keep at least this many"},
                                       "max": {"type": "integer", "minimum": 0,
                                               "description": "run-time ratio budgets: keep at most this many"}},
                        "oneOf": [{"required": ["count"]}, {"required": ["ratio"]}],
                        "dependentRequired": {"of": ["ratio"], "min": ["ratio"], "max": ["ratio"]},
                        "description": "count of candidates kept (0 drops them all, e.g. ToDRE's stage 2), "
                                       "or ratio of the original candidates (`of: stage`: of those reaching "
                                       "the stage)",
                    },
                    "positions": {"enum": ["keep_original", "renumber"]},
                    "scope": {"enum": ["all", "per_image"],
                              "description": "select over the whole visual span of a row (all, the default) or "
                                             "within each image, each keeping its share (per_image: a ratio "
                                             "applies to each image, a count is the row's total)"},
                    "rounding": {"enum": ["half_up", "half_even", "floor"],
                                 "description": "how a ratio budget becomes a count (default: the method's "
                                                "official code: `prunec methods NAME`)"},
                    "protect": {"type": "array", "uniqueItems": True,
                                "items": {"enum": ["text", "cls"]}},
                },
            },
        },
    }

