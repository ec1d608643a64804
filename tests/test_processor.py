"""Processor in, pruned answer out: an artifact built from a model directory ships its tokenizer,
image processor and chat template; `prunec.load_processor` returns them and the loaded module takes
the processor's keyword output. The model directory is made here: the tiny LLaVA's weights plus a
word-level tokenizer (w3..w254, <image> = 255 as in the config), a PIL CLIP image processor at 28 px
and a one-line chat template."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from typer.testing import CliRunner

import prunec
from conftest import write_spec
from prunec.cli import app
from prunec.errors import PrunecError
from prunec.models import load_model

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}w9{% endif %}")


def _processor():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 255)}, "<image>": 255}
    words = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>", unk_token="w3",
                                                     extra_special_tokens={"image_token": "<image>"})
    images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=7,
                                       vision_feature_select_strategy="default", image_token="<image>",
                                       num_additional_image_tokens=1, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava-dir")
    load_model({"builtin": "tiny-llava", "seed": 3}, None).save_pretrained(folder)
    _processor().save_pretrained(folder)
    return folder


def _picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _spec(tmp_path, model_dir, pipeline: str, decode: bool = False):
    return write_spec(tmp_path, f"""
        prunec: 1
        name: from-dir
        model: {{path: {model_dir}}}
        inputs: {{batch: 2, seq_len: 24}}
        pipeline: {pipeline}
        """ + ("decode: {policy: static}\n" if decode else ""))


def test_artifact_ships_the_processor_and_takes_its_output(tmp_path, model_dir):
    artifact = prunec.build(_spec(tmp_path, model_dir, "[]"), tmp_path / "out")
    shipped = {p.name for p in artifact.iterdir()}
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja"} <= shipped
    processor = prunec.load_processor(artifact)
    batch = processor(images=[_picture(0), _picture(1)], text=["w5 <image> w7 w8", "<image> w6"],
                      padding=True, return_tensors="pt")
    assert int((batch["input_ids"] == 255).sum()) == 32  # 16 image tokens per row, expanded by the processor
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = hf(**batch).logits
    torch.testing.assert_close(prunec.load(artifact)(**batch), expected, rtol=1e-5, atol=1e-5)


def test_pruned_artifact_on_processor_output_equals_compile(tmp_path, model_dir):
    pipeline = "[{site: \"llm.layers[1]\", method: fastv, keep: {ratio: 0.25}}]"
    artifact = prunec.build(_spec(tmp_path, model_dir, pipeline), tmp_path / "out")
    batch = prunec.load_processor(artifact)(images=_picture(2), text="w4 <image> w5 w6", return_tensors="pt")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    compiled = prunec.compile(hf, _spec(tmp_path, model_dir, pipeline))
    out = prunec.load(artifact)(**batch)
    assert out.shape[1] == batch["input_ids"].shape[1] - 12  # FastV keeps 4 of 16 image tokens
    torch.testing.assert_close(out, compiled(**batch), rtol=0, atol=1e-6)


def test_cli_generate_applies_the_chat_template(tmp_path, model_dir):
    artifact = prunec.build(_spec(tmp_path, model_dir, "[]", decode=True), tmp_path / "out")
    picture = tmp_path / "p.png"
    _picture(4).save(picture)
    processor = prunec.load_processor(artifact)
    # the template by hand: "user: <image> w5 w6 " then the generation prompt "w9"
    batch = processor(images=_picture(4), text="user: <image> w5 w6 w9", return_tensors="pt")
    generator = prunec.load_generator(artifact)
    expected = generator.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=4)
    assert torch.equal(generator.generate(**batch, max_new_tokens=4), expected)  # the processor's keyword output
    result = CliRunner().invoke(app, ["generate", str(artifact), "--prompt", "w5 w6", "--image", str(picture),
                                      "--max-new-tokens", "4", "--ids"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == " ".join(map(str, expected[0].tolist()))
    raw = processor(images=_picture(4), text="<image>\nw5 w6", return_tensors="pt")
    expected_raw = prunec.load_generator(artifact).generate(*raw.values(), max_new_tokens=4)
    result = CliRunner().invoke(app, ["generate", str(artifact), "--prompt", "w5 w6", "--image", str(picture),
                                      "--max-new-tokens", "4", "--ids", "--raw"])
    assert result.output.strip().splitlines()[-1] == " ".join(map(str, expected_raw[0].tolist()))


def test_artifact_from_a_config_has_no_processor(build):
    _, _, artifact = build("""
        prunec: 1
        name: no-processor
        model: {builtin: tiny-llava}
        inputs: {seq_len: 40}
        pipeline: []
    """)
    with pytest.raises(PrunecError, match="ships no tokenizer or processor"):
        prunec.load_processor(artifact)


def test_build_quiet_prints_only_the_path_and_no_loading_bars(tmp_path, model_dir):
    """transformers prints a weight-loading bar to stderr when a model directory loads (the control
    run shows it); --quiet leaves the artifact path on stdout and nothing on stderr."""
    import subprocess
    import sys

    spec = _spec(tmp_path, model_dir, "[]")
    runs = {flag: subprocess.run([sys.executable, "-m", "prunec.cli", "build", str(spec), "-o", str(tmp_path / flag),
                                  *(["--quiet"] if flag == "quiet" else [])], capture_output=True, text=True)
            for flag in ("loud", "quiet")}
    assert runs["loud"].returncode == 0 and "Loading weights" in runs["loud"].stderr
    assert runs["quiet"].returncode == 0 and runs["quiet"].stderr == ""
    assert runs["quiet"].stdout.strip() == str(tmp_path / "quiet" / "from-dir")
