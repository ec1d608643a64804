"""smollm2-text: SmolLM2-135M continuing windows of bundled news text (gensim's Lee corpus).
Each window's last position predicts the next token; metrics are the agreement of the pruned
model's greedy token with the unpruned one's and the perplexity of the true next token."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from . import Task, register_task

WINDOW = 128  # tokens a window's prompt holds; the target is the token after it


@lru_cache(maxsize=2)
def _windows(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts [N, WINDOW], next tokens [N]): consecutive non-overlapping windows of each document."""
    import transformers

    from ..zoo import data

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts, targets = [], []
    for doc in data.news_documents():
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        for start in range(0, len(ids) - WINDOW, WINDOW + 1):
            prompts.append(ids[start:start + WINDOW])
            targets.append(ids[start + WINDOW])
    return torch.tensor(prompts), torch.tensor(targets)


@register_task
class SmolLM2Text(Task):
    name = "smollm2-text"
    zoo = "smollm2-135m"
    summary = "SmolLM2-135M next token after 128-token windows of news text: agreement and perplexity"
    output = {"logits": "last"}

    def capture_inputs(self, model_dir):
        return {"batch": 2, "seq_len": WINDOW}

    def batches(self, model_dir, limit, batch_size):
        prompts, targets = _windows(model_dir)
        prompts, targets = prompts[:limit], targets[:limit]
        return [((prompts[i:i + batch_size], torch.ones_like(prompts[i:i + batch_size])), targets[i:i + batch_size])
                for i in range(0, len(targets), batch_size)]

    def metrics(self, outputs, labels, reference):
        logits = torch.cat([o.reshape(len(y), -1) for o, y in zip(outputs, labels)]).float()
        ref = torch.cat([o.reshape(len(y), -1) for o, y in zip(reference, labels)]).float()
        target = torch.cat(labels)
        nll = F.cross_entropy(logits, target).item()
        return {"agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                "perplexity": math.exp(nll),
                "top1_accuracy": (logits.argmax(-1) == target).float().mean().item()}
