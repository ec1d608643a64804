"""Invalid specs: each exits 2 with `file:line:col: error at <pointer>: <what was expected>` and no
traceback. Expected lines are written by hand from the YAML below, not taken from the code."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from prunec.cli import app

BASE = """\
prunec: 1
name: bad
model:
  builtin: tiny-llava
inputs:
  batch: 2
  seq_len: 30
pipeline:
  - site: llm.layers[1]
    method: fastv
    keep: {ratio: 0.5}
"""


def variant(replace: dict[int, str] | None = None, append: str = "", delete: tuple[int, ...] = ()) -> str:
    """BASE with 1-based lines replaced (a value may hold several lines) or deleted, plus an appendix."""
    lines = BASE.splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if number in delete:
            continue
        out.append((replace or {}).get(number, line))
    return "\n".join(out) + "\n" + append


TWO_STAGES = variant(replace={9: "  - site: projector.output", 10: "    method: divprune",
                              11: "    keep: {count: 8}"},
                     append="  - site: llm.layers[1]\n    method: fastv\n    keep: {count: 10}\n")

# (case id, {file name: text}, file to validate, expected line, text the message must contain)
CASES = [
    ("unknown-top-level-key", {"s.yaml": variant(append="colour: red\n")}, 12, "unknown key 'colour'"),
    ("unknown-stage-key", {"s.yaml": variant(replace={10: "    methd: fastv"})}, 10, "unknown key 'methd'"),
    ("wrong-type", {"s.yaml": variant(replace={6: "  batch: two"})}, 6, "expected integer"),
    ("layer-out-of-range", {"s.yaml": variant(replace={9: "  - site: llm.layers[9]"})}, 9, "out of range"),
    ("budget-too-large", {"s.yaml": variant(replace={11: "    keep: {count: 99}"})}, 11, "only 16 candidates"),
    ("ratio-zero", {"s.yaml": variant(replace={11: "    keep: {ratio: 0}"})}, 11, "expected a number > 0"),
    ("ratio-above-one", {"s.yaml": variant(replace={11: "    keep: {ratio: 1.5}"})}, 11, "expected a number <= 1"),
    ("unknown-method", {"s.yaml": variant(replace={10: "    method: fastvv"})}, 10,
     "unknown method 'fastvv'; did you mean 'fastv'?"),
    ("unknown-site-for-family", {"s.yaml": variant(replace={9: "  - site: vision.layers[0]"})}, 9,
     "does not exist for family llava"),
    ("missing-model", {"s.yaml": variant(delete=(3, 4))}, 1, "'model' is a required property"),
    ("python-tag", {"s.yaml": variant(replace={6: "  batch: !!python/object/apply:os.system ['echo hi']"})}, 6,
     "is not allowed"),
    ("duplicate-key", {"s.yaml": variant(replace={7: "  batch: 3"})}, 7, "duplicate key 'batch'"),
    ("circular-extends", {"s.yaml": "prunec: 1\nextends: t.yaml\nname: a\n",
                          "t.yaml": "prunec: 1\nextends: s.yaml\nname: b\n"}, 2, "circular extends"),
    ("wrong-format-version", {"s.yaml": variant(replace={1: "prunec: 2"})}, 1, "expected 1"),
    ("missing-pipeline", {"s.yaml": variant(delete=(8, 9, 10, 11))}, 1, "'pipeline' is a required property"),
    ("two-model-sources", {"s.yaml": variant(replace={4: "  builtin: tiny-llava\n  path: ./weights"})}, 4,
     "exactly one of `builtin`, `path`, `config` or `zoo`"),
    ("model-path-missing", {"s.yaml": variant(replace={4: "  path: ./no-such-dir"})}, 4, "does not exist"),
    ("invalid-yaml", {"s.yaml": variant(replace={11: "    keep: {ratio: 0.5"})}, 12, "invalid YAML"),
    ("empty-file", {"s.yaml": ""}, 1, "spec is empty"),
    ("count-and-ratio", {"s.yaml": variant(replace={11: "    keep: {count: 2, ratio: 0.5}"})}, 11,
     "exactly one of `count` or `ratio`"),
    ("budget-list-length", {"s.yaml": variant(replace={9: "  - site: llm.layers[1, 2]",
                                                       11: "    keep: {ratio: [0.5]}"})}, 11, "expected 2 budgets"),
    ("stages-out-of-order", {"s.yaml": variant(replace={9: "  - site: llm.layers[2]"},
                                               append="  - site: llm.layers[1]\n    method: fastv\n"
                                                      "    keep: {ratio: 0.25}\n")}, 12, "does not come after"),
    ("fastv-needs-layer-site", {"s.yaml": variant(replace={9: "  - site: projector.output"})}, 9,
     "needs a `llm.layers[i]` site"),
    ("keep-original-before-llm", {"s.yaml": variant(replace={9: "  - site: projector.output",
                                                             10: "    method: divprune",
                                                             11: "    keep: {ratio: 0.5}\n    positions: keep_original"})},
     12, "use renumber"),
    ("unknown-method-param", {"s.yaml": variant(replace={11: "    keep: {ratio: 0.5}\n    params: {queyr: last}"})}, 12,
     "unknown key 'queyr'"),
    ("bad-method-param-value", {"s.yaml": variant(replace={11: "    keep: {ratio: 0.5}\n    params: {query: first}"})},
     12, "expected one of: last, all"),
    ("protect-cls-on-llava", {"s.yaml": variant(replace={11: "    keep: {ratio: 0.5}\n    protect: [cls]"})}, 12,
     "cannot protect 'cls'"),
    ("vflowopt-budget-under-its-cells", {"s.yaml": variant(replace={
        9: "  - site: projector.output", 10: "    method: vflowopt\n    action: merge\n    params: {cell: 2}",
        11: "    keep: {count: 3}"})}, 13, "vflowopt keeps one token per grid cell at least: 4 cells"),
    ("cls-pooling-of-a-prunable-cls", {"s.yaml": variant(replace={
        4: "  builtin: tiny-bert", 9: "  - site: encoder.layers[1]", 10: "    method: spatten",
        11: "    keep: {ratio: 0.5}\n    protect: []"}, append="output: {pooling: cls}\n")}, 12,
     "output.pooling: cls returns the [CLS] vector, which this stage may prune"),
    ("pooling-on-a-vlm", {"s.yaml": variant(append="output: {pooling: mean}\n")}, 12,
     "family llava offers no pooling, not mean"),
    ("tome-in-a-text-encoder", {"s.yaml": variant(replace={4: "  builtin: tiny-bert", 9: "  - site: encoder.layers[1]",
                                                           10: "    method: tome"})}, 9,
     "method tome works in vision sites, not encoder"),
    ("tome-merges-more-than-its-a-tokens", {"s.yaml": "prunec: 1\nname: t\nmodel: {builtin: tiny-vit}\npipeline:\n"
                                            "  - {site: 'vision.layers[1]', method: tome, keep: {count: 7}}\n"}, 5,
     "tome merges at most 8 of 16 tokens in one stage"),
    ("triton-backend-without-kernels", {"s.yaml": variant(replace={9: "  - site: projector.output", 10: "    method: holov"},
                                                          append="backend: triton\n")}, 12, "no Triton kernel for holov"),
    ("bad-name", {"s.yaml": variant(replace={2: "name: a/b"})}, 2, "expected a name of letters, digits"),
    ("extends-missing-file", {"s.yaml": "prunec: 1\nextends: nowhere.yaml\nname: x\n"}, 2, "does not exist"),
    ("attention-needs-sdpa", {"s.yaml": variant(replace={4: "  builtin: tiny-llava\n  attn_implementation: eager"})},
     11, "set model.attn_implementation: sdpa"),
    ("vflowopt-llm-without-vflowopt", {"s.yaml": variant(replace={10: "    method: vflowopt_llm"})}, 10,
     "method vflowopt_llm reads vision_importance, which a stage of vflowopt computes; add one earlier"),
    ("scoped-method-in-a-fusion", {"s.yaml": variant(replace={
        10: "    method: fuse\n    params: {terms: [{method: fastv}, {method: catp_query}]}"})}, 11,
     "method 'catp_query' scores one image scope (query); a fusion cannot take it"),
    ("scoped-budget-over-the-scope", {"s.yaml": variant(replace={
        7: "  seq_len: 40\n  images: 2", 10: "    method: catp_query", 11: "    keep: {count: 24}"})}, 12,
     "budget keeps 24 tokens but only 16 candidates reach llm.layers[1] in the query image"),
    ("ratio-keeps-nothing", {"s.yaml": variant(replace={11: "    keep: {ratio: 0.01}"})}, 11, "keeps 0 of 16"),
    ("later-stage-over-budget", {"s.yaml": TWO_STAGES}, 14, "only 8 candidates reach llm.layers[1]"),
    ("malformed-site", {"s.yaml": variant(replace={9: "  - site: llm.layer[1]"})}, 9, "expected a site: llm.layers[i]"),
    ("alias-bomb", {"s.yaml": "a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n"},
     1, "alias expansions"),  # reported at the anchored node that is expanded too often
    ("yaml-merge-key", {"s.yaml": variant(replace={5: "inputs:\n  <<: {batch: 2}"}, delete=(6,))}, 6, "merge keys"),
    ("non-string-key", {"s.yaml": variant(append="1: x\n")}, 12, "keys must be strings"),
    ("pipeline-mapping-without-extends", {"s.yaml": variant(replace={9: "  fastv: {keep: {ratio: 0.5}}"},
                                                            delete=(10, 11))}, 9, "needs `extends:`"),
    ("patch-unknown-stage-id", {"base.yaml": variant(replace={9: "  - id: first\n    site: llm.layers[1]"}),
                                "s.yaml": "prunec: 1\nextends: base.yaml\npipeline:\n  second:\n"
                                          "    keep: {ratio: 0.25}\n"}, 4, "no stage with id 'second'"),
    ("inherited-error-points-at-base", {"base.yaml": variant(replace={11: "    keep: {ratio: 0.01}"}),
                                        "s.yaml": "prunec: 1\nextends: base.yaml\nname: child\n"}, 11, "keeps 0 of 16"),
    ("missing-seq-len", {"s.yaml": variant(delete=(7,))}, 5, "needs `inputs.seq_len`"),
    ("image-size-not-patch-multiple", {"s.yaml": variant(replace={7: "  seq_len: 30\n  image_size: 30"})}, 8,
     "multiple of the patch size 7"),
    ("spec-is-a-list", {"s.yaml": "- prunec: 1\n"}, 1, "must be a YAML mapping"),
    ("too-large", {"s.yaml": "a: " + "x" * (1 << 20) + "\n"}, 1, "larger than 1048576 bytes"),
    ("two-documents", {"s.yaml": "a: 1\n---\nb: 2\n"}, 1, "holds 2 documents"),
    ("control-character", {"s.yaml": variant(replace={2: "name: b\x08ad"})}, 2, "is not allowed"),
    ("float-for-integer", {"s.yaml": variant(replace={7: "  seq_len: 30.0"})}, 7, "expected integer"),
    ("huge-seed", {"s.yaml": variant(replace={4: "  builtin: tiny-llava\n  seed: 99999999999999999999999"})}, 5,
     "expected a number <= 4294967295"),
    ("seq-len-shorter-than-image", {"s.yaml": variant(replace={7: "  seq_len: 10"})}, 7,
     "expected a sequence length in 18..512"),
    ("seq-len-beyond-positions", {"s.yaml": variant(replace={7: "  seq_len: 100000"})}, 7, "18..512"),
    ("nul-in-extends", {"s.yaml": "prunec: 1\nextends: \"a\\0b.yaml\"\nname: x\n"}, 2, "without NUL"),
    ("negative-seed", {"s.yaml": variant(replace={4: "  builtin: tiny-llava\n  seed: -1"})}, 5, "expected a number >= 0"),
    ("images-on-a-text-model", {"s.yaml": variant(replace={4: "  builtin: tiny-llama", 7: "  seq_len: 30\n  images: 2",
                                                           9: "  - site: llm.layers[1]"})}, 8,
     "family llama takes no images in its token sequence"),
    ("seq-len-too-short-for-images", {"s.yaml": variant(replace={7: "  seq_len: 30\n  images: 3"})}, 7,
     "at least 52 for 3 images of 16 tokens"),
    ("context-scope-needs-several-images", {"s.yaml": variant(replace={10: "    method: catp_context"})}, 10,
     "set `inputs.images` to 2 or more"),
    ("vision-attention-over-several-images", {"s.yaml": variant(replace={
        7: "  seq_len: 40\n  images: 2", 9: "  - site: projector.output", 10: "    method: fastervlm"})}, 11,
     "reads the vision tower per image, which prunec supports with one image per row"),
    ("per-image-budget-not-a-multiple", {"s.yaml": variant(replace={
        7: "  seq_len: 40\n  images: 2", 9: "  - site: projector.output", 10: "    method: catp",
        11: "    keep: {count: 9}"})}, 12, "keeps the same count in each of the 2 images; 9 is not a multiple"),
    ("query-count-made-data-dependent", {"s.yaml": variant(replace={
        7: "  seq_len: 40\n  images: 2", 9: "  - site: projector.output", 10: "    method: divprune",
        11: "    keep: {count: 20}"}, append="  - site: llm.layers[1]\n    method: catp_query\n    keep: {count: 18}\n")},
     14, "needs the query image's token count"),
    ("attention-layers-across-a-cut", {"s.yaml": variant(replace={
        7: "  seq_len: 40\n  images: 2", 10: "    method: catp_query", 11: "    keep: {count: 8}"},
        append="  - site: llm.layers[2]\n    method: catp_context\n    keep: {count: 10}\n")}, 13,
     "reads layer 1's attention, which saw the tokens before the earlier stage's cut after layer 1"),
    ("decode-dynamic-not-yet", {"s.yaml": variant(append="decode: {policy: dynamic}\n")}, 12, "not implemented yet"),
    ("decode-on-a-vision-model", {"s.yaml": "prunec: 1\nname: v\nmodel: {builtin: tiny-vit}\npipeline: []\n"
                                            "decode: {policy: static}\n"}, 5, "does not generate"),
    ("last-logits-on-a-vision-model", {"s.yaml": "prunec: 1\nname: v\nmodel: {builtin: tiny-vit}\npipeline: []\n"
                                                 "output: {logits: last}\n"}, 5, "applies to causal LMs"),
    ("pyramiddrop-at-the-last-layer", {"s.yaml": variant(replace={9: "  - site: llm.layers[3]",
                                                                  10: "    method: pyramiddrop"})}, 9,
     "is the last of llm's 4 layers: no layer runs after it"),
]


# (column, JSON pointer) of each case, derived by hand from its YAML text: the value's (or, for
# an unknown key, the key's) first character, 1-based; "" is the root (printed as "/")
LOCATIONS = {
    'unknown-top-level-key': (1, '/colour'),
    'unknown-stage-key': (5, '/pipeline/0/methd'),
    'wrong-type': (10, '/inputs/batch'),
    'layer-out-of-range': (11, '/pipeline/0/site'),
    'budget-too-large': (19, '/pipeline/0/keep/count'),
    'ratio-zero': (19, '/pipeline/0/keep/ratio'),
    'ratio-above-one': (19, '/pipeline/0/keep/ratio'),
    'unknown-method': (13, '/pipeline/0/method'),
    'unknown-site-for-family': (11, '/pipeline/0/site'),
    'missing-model': (1, ''),
    'python-tag': (10, '/inputs/batch'),
    'duplicate-key': (3, '/inputs/batch'),
    'circular-extends': (10, '/extends'),
    'wrong-format-version': (9, '/prunec'),
    'missing-pipeline': (1, ''),
    'two-model-sources': (3, '/model'),
    'model-path-missing': (9, '/model/path'),
    'invalid-yaml': (1, ''),
    'empty-file': (1, ''),
    'count-and-ratio': (11, '/pipeline/0/keep'),
    'budget-list-length': (19, '/pipeline/0/keep/ratio'),
    'stages-out-of-order': (11, '/pipeline/1/site'),
    'fastv-needs-layer-site': (11, '/pipeline/0/site'),
    'keep-original-before-llm': (16, '/pipeline/0/positions'),
    'unknown-method-param': (14, '/pipeline/0/params/queyr'),
    'bad-method-param-value': (21, '/pipeline/0/params/query'),
    'protect-cls-on-llava': (15, '/pipeline/0/protect/0'),
    'vflowopt-budget-under-its-cells': (19, '/pipeline/0/keep/count'),
    'cls-pooling-of-a-prunable-cls': (14, '/pipeline/0/protect'),
    'pooling-on-a-vlm': (19, '/output/pooling'),
    'tome-in-a-text-encoder': (11, '/pipeline/0/site'),
    'tome-merges-more-than-its-a-tokens': (60, '/pipeline/0/keep/count'),
    'triton-backend-without-kernels': (10, '/backend'),
    'bad-name': (7, '/name'),
    'extends-missing-file': (10, '/extends'),
    'attention-needs-sdpa': (13, '/pipeline/0/method'),
    'vflowopt-llm-without-vflowopt': (13, '/pipeline/0/method'),
    'scoped-method-in-a-fusion': (48, '/pipeline/0/params/terms/1/method'),
    'scoped-budget-over-the-scope': (19, '/pipeline/0/keep/count'),
    'ratio-keeps-nothing': (19, '/pipeline/0/keep/ratio'),
    'later-stage-over-budget': (19, '/pipeline/1/keep/count'),
    'malformed-site': (11, '/pipeline/0/site'),
    'alias-bomb': (4, '/c/5/4'),
    'yaml-merge-key': (3, '/inputs'),
    'non-string-key': (1, ''),
    'pipeline-mapping-without-extends': (3, '/pipeline'),
    'patch-unknown-stage-id': (3, '/pipeline/second'),
    'inherited-error-points-at-base': (19, '/pipeline/0/keep/ratio'),
    'missing-seq-len': (1, '/inputs'),
    'image-size-not-patch-multiple': (15, '/inputs/image_size'),
    'spec-is-a-list': (1, ''),
    'too-large': (1, ''),
    'two-documents': (1, ''),
    'control-character': (8, ''),
    'float-for-integer': (12, '/inputs/seq_len'),
    'huge-seed': (9, '/model/seed'),
    'seq-len-shorter-than-image': (12, '/inputs/seq_len'),
    'seq-len-beyond-positions': (12, '/inputs/seq_len'),
    'nul-in-extends': (10, '/extends'),
    'negative-seed': (9, '/model/seed'),
    'images-on-a-text-model': (11, '/inputs/images'),
    'seq-len-too-short-for-images': (12, '/inputs/seq_len'),
    'context-scope-needs-several-images': (13, '/pipeline/0/method'),
    'vision-attention-over-several-images': (13, '/pipeline/0/method'),
    'per-image-budget-not-a-multiple': (19, '/pipeline/0/keep/count'),
    'query-count-made-data-dependent': (13, '/pipeline/1/method'),
    'attention-layers-across-a-cut': (11, '/pipeline/1/site'),
    'decode-dynamic-not-yet': (18, '/decode/policy'),
    'decode-on-a-vision-model': (1, '/decode'),
    'last-logits-on-a-vision-model': (18, '/output/logits'),
    'pyramiddrop-at-the-last-layer': (11, '/pipeline/0/site'),
}


def _expected_file(case_id: str, files: dict[str, str]) -> str:
    if case_id == "circular-extends":
        return "t.yaml"
    if case_id == "inherited-error-points-at-base":
        return "base.yaml"
    return "s.yaml"


@pytest.mark.parametrize("case_id,files,line,message", CASES, ids=[c[0] for c in CASES])
def test_invalid_spec_reports_location_and_exits_2(tmp_path, case_id, files, line, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "s.yaml")])
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    where = str(tmp_path / _expected_file(case_id, files))
    column, pointer = LOCATIONS[case_id]
    assert f"{where}:{line}:{column}: error at {pointer or '/'}: " in output, output
    assert message in output, output


def test_enough_distinct_cases():
    assert len({c[0] for c in CASES}) >= 25
    assert set(LOCATIONS) == {c[0] for c in CASES}


@pytest.mark.parametrize("case_id", ["python-tag", "layer-out-of-range", "circular-extends"])
def test_real_process_exit_code_and_no_traceback(tmp_path, case_id):
    _, files, line, message = next(c for c in CASES if c[0] == case_id)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "prunec.cli", "build", str(tmp_path / "s.yaml"),
                           "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f":{line}:" in proc.stderr and message in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
