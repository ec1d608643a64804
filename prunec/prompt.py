"""Model inputs for `prunec generate`: a tokenized prompt (and image), token ids, or seeded examples."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .adapters.base import ExampleShape
from .errors import PrunecError


def prompt_inputs(generator, artifact: Path, prompt: str | None, image: Path | None, input_ids: str | None,
                  seed: int):
    """(model inputs, tokenizer or None, a note for the user or None)."""
    lock = yaml.safe_load((artifact / "spec.lock.yaml").read_text())
    adapter = generator.adapter
    if prompt is not None and input_ids is not None:
        raise PrunecError("give --prompt or --input-ids, not both")
    if prompt is not None:
        return _from_prompt(lock, generator, prompt, image)
    if image is not None:
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


def _from_prompt(lock: dict, generator, prompt: str, image: Path | None):
    adapter = generator.adapter
    if "path" not in lock["model"]:
        raise PrunecError("this model was built from a config (no tokenizer); use --input-ids or no prompt")
    path = lock["model"]["path"]
    if adapter.needs_image:
        from transformers import AutoProcessor

        if image is None:
            raise PrunecError(f"family {adapter.family} needs --image with --prompt")
        from PIL import Image

        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        batch = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
        return (batch["input_ids"], batch["attention_mask"], batch["pixel_values"]), processor.tokenizer, None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(prompt, return_tensors="pt")
    return _fit_text(lock, generator, batch["input_ids"], batch["attention_mask"]), tokenizer, None


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
