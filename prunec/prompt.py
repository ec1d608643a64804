"""Model inputs for `prunec generate`: a tokenized prompt (and image), token ids, or seeded examples."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .adapters.base import ExampleShape
from .errors import PrunecError


def prompt_inputs(generator, artifact: Path, prompt: str | None, images: list[Path] | None, input_ids: str | None,
                  seed: int, raw: bool = False):
    """(model inputs, tokenizer or None, a note for the user or None). Several images make a batch:
    one row per image, each with the prompt."""
    lock = yaml.safe_load((artifact / "spec.lock.yaml").read_text())
    adapter = generator.adapter
    if prompt is not None and input_ids is not None:
        raise PrunecError("give --prompt or --input-ids, not both")
    if prompt is not None:
        return _from_prompt(artifact, lock, generator, prompt, images, raw)
    if images:
        raise PrunecError("--image needs --prompt (the processor places the image tokens)")
    if input_ids is not None:
        try:
            ids = torch.tensor([[int(t) for t in input_ids.split()]])
        except ValueError:
            raise PrunecError(f"--input-ids must be space-separated integers, got {input_ids!r}") from None
        if ids.numel() == 0:
            raise PrunecError("--input-ids is empty")
        if adapter.needs_image:
            raise PrunecError(f"family {adapter.family} takes an image: use --prompt with --image, or no prompt")
        return _fit_text(lock, generator, ids, torch.ones_like(ids)), None, None
    inputs = lock["inputs"]
    shape = ExampleShape(1, inputs.get("seq_len"), inputs.get("image_size"), inputs.get("images", 1))
    return adapter.example_inputs(shape, seed), None, f"no prompt: seeded example inputs {shape} (seed {seed})"


def chat_text(processor, prompt: str, with_image: bool) -> str:
    """The prompt as one user turn of the model's chat template (with the image first when there is
    one), ending where the assistant answers; the prompt as written when there is no template."""
    if getattr(processor, "chat_template", None) is None:
        return prompt
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def _from_prompt(artifact: Path, lock: dict, generator, prompt: str, images: list[Path] | None, raw: bool):
    from .preprocessing import load_processor

    adapter = generator.adapter
    processor = load_processor(artifact)
    if adapter.needs_image:
        if not images:
            raise PrunecError(f"family {adapter.family} needs --image with --prompt")
        from PIL import Image

        placeholder = getattr(processor, "image_token", None) or "<image>"
        text = prompt if raw else chat_text(processor, prompt.replace(placeholder, "").strip(), True)
        if placeholder not in text:
            text = f"{placeholder}\n{text}"
        processor.tokenizer.padding_side = "left"  # the generator continues every row at its end
        batch = processor(images=[Image.open(path).convert("RGB") for path in images], text=[text] * len(images),
                          padding=True, return_tensors="pt")
        return (batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), processor.tokenizer, None
    if images:
        raise PrunecError(f"family {adapter.family} takes no image")
    text = prompt if raw else chat_text(processor, prompt, False)
    batch = processor(text, return_tensors="pt", add_special_tokens=raw or processor.chat_template is None)
    return _fit_text(lock, generator, batch["input_ids"], batch["attention_mask"]), processor, None


def _fit_text(lock: dict, generator, ids: torch.Tensor, mask: torch.Tensor):
    """Text pruning budgets were resolved for the spec's seq_len: left-pad a shorter prompt to it."""
    if not lock["pipeline"]:
        return ids, mask
    seq_len = lock["inputs"]["seq_len"]
    if ids.shape[1] > seq_len:
        raise PrunecError(f"the prompt has {ids.shape[1]} tokens; this artifact prunes text with budgets "
                          f"resolved for seq_len {seq_len}, so prompts may be at most that long")
    pad = seq_len - ids.shape[1]
    ids = torch.cat([ids.new_full((ids.shape[0], pad), generator.pad_token_id), ids], dim=1)
    return ids, torch.cat([mask.new_zeros((mask.shape[0], pad)), mask], dim=1)
