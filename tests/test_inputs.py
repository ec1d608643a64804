"""Run-time inputs: what an artifact accepts is recorded in its manifest and checked before the
exported program runs. Every bad input is one `PrunecInputError` line naming the input and what is
accepted (exit 2 from the CLI, no traceback); lossless conversions happen silently; a processor's
keyword output works. Expected messages are written here from the tiny models' configs (vocab 256,
image token 255, 16 image tokens per 28 px image, 7 px patches, 512 positions)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import prunec
from conftest import llava_inputs
from prunec.cli import app
from prunec.errors import PrunecInputError
from prunec.models import builtin_config

LLAVA = """
    prunec: 1
    name: inputs-llava
    model: {builtin: tiny-llava}
    inputs: {batch: 2, seq_len: 40}
    pipeline:
      - site: projector.output
        method: divprune
        keep: {ratio: 0.5}
      - site: llm.layers[1]
        method: fastv
        keep: {ratio: 0.25}
"""
VIT = """
    prunec: 1
    name: inputs-vit
    model: {builtin: tiny-vit}
    pipeline:
      - site: vision.layers[1]
        method: tome
        keep: {ratio: 0.5}
"""
CONFIG = builtin_config("tiny-llava")


@pytest.fixture(scope="module")
def llava(build):
    return build(LLAVA)


def _good(batch=2, seq_len=40):
    ids, mask, pixels = llava_inputs(CONFIG, [0, 3, 1][:batch] + [0] * max(0, batch - 3), seq_len)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _with(**changes):
    inputs = _good()
    for key, value in changes.items():
        if value is None:
            inputs.pop(key)
        else:
            inputs[key] = value(inputs) if callable(value) else value
    return inputs


def _no_image(inputs):
    ids = inputs["input_ids"].clone()
    ids[ids == 255] = 7
    return ids


def _one_image_token_short(inputs):
    ids = inputs["input_ids"].clone()
    row = ids[1]
    row[(row == 255).nonzero()[0]] = 7
    return ids


# (case, inputs, words the one line must hold: the input's name and what the artifact takes)
BAD = [
    ("seq-too-short", lambda: _with(input_ids=lambda i: i["input_ids"][:, :17],
                                    attention_mask=lambda i: i["attention_mask"][:, :17]),
     ["input_ids", "(2, 17)", "seq in 18..512"]),
    ("seq-too-long", lambda: _good(seq_len=513), ["input_ids", "seq in 18..512"]),
    ("image-56px", lambda: _with(pixel_values=torch.randn(2, 3, 56, 56)),
     ["pixel_values", "(images, 3, 28, 28)", "fixed at 28"]),
    ("image-one-channel", lambda: _with(pixel_values=torch.randn(2, 1, 28, 28)),
     ["pixel_values", "(images, 3, 28, 28)"]),
    ("pixels-3d", lambda: _with(pixel_values=torch.randn(3, 28, 28)), ["pixel_values", "(images, 3, 28, 28)"]),
    ("pixels-float64", lambda: _with(pixel_values=lambda i: i["pixel_values"].double()),
     ["pixel_values", "float64", "float32"]),
    ("pixels-int", lambda: _with(pixel_values=lambda i: i["pixel_values"].to(torch.uint8)),
     ["pixel_values", "uint8", "float32"]),
    ("ids-float", lambda: _with(input_ids=lambda i: i["input_ids"].float()), ["input_ids", "float32", "integer"]),
    ("ids-out-of-vocab", lambda: _with(input_ids=lambda i: torch.where(torch.arange(40) == 39, 300, i["input_ids"])),
     ["input_ids", "holds 300", "token ids in 0..255"]),
    ("ids-negative", lambda: _with(input_ids=lambda i: torch.where(torch.arange(40) == 38, -1, i["input_ids"])),
     ["input_ids", "holds -1", "0..255"]),
    ("mask-value-2", lambda: _with(attention_mask=lambda i: i["attention_mask"] * 2),
     ["attention_mask", "holds 2", "mask values in 0..1"]),
    ("mask-float", lambda: _with(attention_mask=lambda i: i["attention_mask"].float()),
     ["attention_mask", "float32", "integer or bool"]),
    ("mask-batch-differs", lambda: _with(attention_mask=lambda i: i["attention_mask"][:1]),
     ["attention_mask", "batch 1", "input_ids has 2"]),
    ("mask-length-differs", lambda: _with(attention_mask=lambda i: i["attention_mask"][:, :30]),
     ["attention_mask", "seq 30", "input_ids has 40"]),
    ("no-image-tokens", lambda: _with(input_ids=_no_image), ["input_ids", "row 0 holds 0 image tokens",
                                                             "exactly 16 per row"]),
    ("15-image-tokens", lambda: _with(input_ids=_one_image_token_short),
     ["input_ids", "row 1 holds 15 image tokens", "exactly 16"]),
    ("too-few-images", lambda: _with(pixel_values=lambda i: i["pixel_values"][:1]),
     ["pixel_values", "1 images for a batch of 2", "1 per row"]),
    ("too-many-images", lambda: _with(pixel_values=lambda i: torch.cat([i["pixel_values"]] * 2)),
     ["pixel_values", "4 images for a batch of 2"]),
    ("batch-0", lambda: {k: v[:0] for k, v in _good().items()}, ["input_ids", "batch in 1..4096"]),
    ("missing-pixels", lambda: _with(pixel_values=None), ["missing input pixel_values",
                                                         "input_ids, attention_mask, pixel_values"]),
    ("unknown-input", lambda: _with(image_sizes=torch.tensor([[28, 28]] * 2)),
     ["unexpected input 'image_sizes'", "input_ids, attention_mask, pixel_values"]),
    ("list-not-tensor", lambda: _with(attention_mask=lambda i: i["attention_mask"].tolist()),
     ["attention_mask", "list", "torch.Tensor"]),
    ("ids-1d", lambda: _with(input_ids=lambda i: i["input_ids"][0]), ["input_ids", "(40,)", "(batch, seq)"]),
]


@pytest.mark.parametrize("case, make, words", BAD, ids=[case for case, _, _ in BAD])
def test_bad_inputs_give_one_line_naming_the_input(llava, case, make, words):
    _, module, artifact = llava
    before = sorted((p.name, p.stat().st_mtime_ns) for p in artifact.iterdir())
    with pytest.raises(PrunecInputError) as caught:
        module(**make())
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    for leak in ("Runtime assertion", "Piecewise", "re-export", "Expected input"):  # torch's own guard text
        assert leak not in message
    assert sorted((p.name, p.stat().st_mtime_ns) for p in artifact.iterdir()) == before  # nothing written


def test_positional_input_errors_name_the_positional_input(llava):
    _, module, _ = llava
    good = _good()
    with pytest.raises(PrunecInputError, match="4 positional inputs; the artifact takes 3"):
        module(*good.values(), good["pixel_values"])
    with pytest.raises(PrunecInputError, match="input input_ids given twice"):
        module(good["input_ids"], input_ids=good["input_ids"], attention_mask=good["attention_mask"],
               pixel_values=good["pixel_values"])


def test_lossless_conversions_and_keywords_give_the_same_output(llava):
    _, module, _ = llava
    good = _good()
    reference = module(*good.values())
    by_name = module(**good)
    converted = module(input_ids=good["input_ids"].int(), attention_mask=good["attention_mask"].bool(),
                       pixel_values=good["pixel_values"])
    assert torch.equal(reference, by_name) and torch.equal(reference, converted)
    half = good["pixel_values"].half()
    assert torch.equal(module(good["input_ids"], good["attention_mask"], half),
                       module(good["input_ids"], good["attention_mask"], half.float()))


def test_manifest_records_the_signature(llava):
    _, _, artifact = llava
    signature = json.loads((artifact / "manifest.json").read_text())["signature"]
    names = [(e["name"], e["dtype"]) for e in signature["inputs"]]
    assert names == [("input_ids", "int64"), ("attention_mask", "int64"), ("pixel_values", "float32")]
    axes = {a["name"]: (a["min"], a["max"]) for a in signature["axes"].values()}
    # seq: 16 image tokens + 2 (LlavaAdapter.seq_len_range) up to max_position_embeddings 512
    assert axes == {"batch": (1, 4096), "seq": (18, 512), "images": (1, 65536)}
    assert signature["inputs"][2]["shape"][1:] == [3, 28, 28]
    rules = {r["kind"]: r for r in signature["rules"] if r["kind"] != "values"}
    assert rules["count_per_row"]["token"] == 255 and rules["count_per_row"]["count"] == 16


def test_vision_image_sides_are_checked(build):
    _, module, _ = build(VIT)
    assert module(torch.randn(3, 3, 28, 28)).shape[0] == 3
    with pytest.raises(PrunecInputError, match=r"pixel_values has shape \(1, 3, 30, 30\).*multiple of 7"):
        module(torch.randn(1, 3, 30, 30))
    # ToMe drops 8 of 16 patches and leaves >= 2 tokens: 10 tokens, [CLS] + 3 x 3 patches at least
    with pytest.raises(PrunecInputError, match="patches_per_side in 3..128"):
        module(torch.randn(1, 3, 7 * 129, 7 * 129))
    # 35 px is 5 x 5 whole patches, inside the captured range, but the position embeddings were
    # specialized to 28 px during export (the program would fail on a shape mismatch)
    with pytest.raises(PrunecInputError, match=r"images of 28x28 only \(position embeddings were captured for 28 px"):
        module(torch.randn(1, 3, 35, 35))


@pytest.mark.parametrize("args, words", [
    (["run", "{artifact}", "--seq-len", "17"], "--seq-len 17: the artifact takes seq in 18..512"),
    (["run", "{artifact}", "--batch", "0"], "--batch"),
    (["run", "{missing}"], "is not a prunec artifact"),
    (["generate", "{artifact}", "--prompt", "hi", "--image", "{missing}/x.png"], "cannot read image"),
    (["schema", "-o", "{missing}/deeper/schema.json"], "cannot write"),
    (["viz", "{artifact}", "-o", "{tmp}/map.jpg"], "written as .png or .svg, not .jpg"),
    (["viz", "{artifact}", "-o", "{tmp}/map.png", "--format", "svg"], "--format svg but"),
    (["build", "{spec}", "-o", "/proc/prunec-cannot-write"], "cannot write the artifact to /proc/prunec-cannot-write"),
    (["methods", "nosuchmethod"], "unknown method 'nosuchmethod'"),
])
def test_cli_user_errors_are_one_line_exit_2(llava, tmp_path, args, words):
    _, _, artifact = llava
    spec = tmp_path / "spec.yaml"
    spec.write_text(LLAVA.replace("\n    ", "\n").strip() + "\n")
    filled = [a.format(artifact=artifact, missing=tmp_path / "missing", tmp=tmp_path, spec=spec) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, filled)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert words in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_version_flag():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"prunec {prunec.__version__}"


def test_eval_task_help_lists_the_task_registry():
    from prunec.cli import _task_names
    from prunec.evals import TASKS, get_task

    get_task(_task_names()[0])  # imports every task module
    assert _task_names() == sorted(TASKS)


# -- a campaign over run-time inputs: anything but a PrunecInputError is a crash ----------------

EXAMPLES = int(os.environ.get("PRUNEC_INPUT_FUZZ_EXAMPLES", "40"))
DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float16,
          torch.float64, torch.bfloat16]


@st.composite
def run_time_inputs(draw):
    """A valid call (batch, length, padding and image-token placement drawn), then 0-3 perturbations
    of shapes, dtypes, counts, sizes, values and names."""
    batch, seq_len = draw(st.integers(1, 4)), draw(st.integers(18, 60))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.randint(3, 255, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        pad = draw(st.integers(0, seq_len - 17))
        start = draw(st.integers(pad, seq_len - 16))
        ids[row, :pad], mask[row, :pad] = 0, 0
        ids[row, start:start + 16] = 255
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch, 3, 28, 28, generator=gen)}
    for change in draw(st.lists(st.sampled_from(PERTURBATIONS), max_size=3)):
        name = draw(st.sampled_from(sorted(inputs))) if inputs else None
        if name is None:
            break
        value = inputs[name]
        if change == "dtype":
            inputs[name] = value.to(draw(st.sampled_from(DTYPES)))
        elif change == "drop":
            del inputs[name]
        elif change == "rows":
            inputs[name] = value[:draw(st.integers(0, value.shape[0]))]
        elif change == "length" and value.dim() > 1:
            inputs[name] = value[:, :draw(st.integers(0, value.shape[1]))]
        elif change == "image_size":
            side = draw(st.sampled_from([14, 21, 30, 56]))
            inputs["pixel_values"] = torch.randn(batch, 3, side, side, generator=gen)
        elif change == "images":
            inputs["pixel_values"] = torch.randn(batch * draw(st.sampled_from([0, 2, 3])), 3, 28, 28, generator=gen)
        elif change == "image_tokens" and "input_ids" in inputs:
            inputs["input_ids"] = inputs["input_ids"].masked_fill(
                torch.rand(inputs["input_ids"].shape, generator=gen) < 0.1, 255)
        elif change == "values" and not value.is_floating_point():
            inputs[name] = value + draw(st.sampled_from([-1, 2, 300]))
        elif change == "extra":
            inputs[draw(st.sampled_from(["image_sizes", "token_type_ids"]))] = torch.zeros(batch, 2)
    return inputs


PERTURBATIONS = ["dtype", "drop", "rows", "length", "image_size", "images", "image_tokens", "values", "extra"]


def test_input_campaign_only_prunec_input_errors(llava):
    _, module, _ = llava
    outcomes = {"ran": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(run_time_inputs())
    def campaign(inputs):
        try:
            out = module(**inputs)
        except PrunecInputError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            return
        outcomes["ran"] += 1
        assert out.shape[0] == inputs["input_ids"].shape[0]

    campaign()
    assert outcomes["refused"] > 0 and outcomes["ran"] > 0
    if EXAMPLES != 40:
        print(f"input campaign: {EXAMPLES} examples, {outcomes}")
