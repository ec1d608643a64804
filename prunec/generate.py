"""Generation from an artifact built with `decode:`: prefill once, then one decode step per token.

Greedy by default; sampling with temperature and top-p from a seeded generator. Rows are
left-padded prompts; a row that emits EOS is finished and pads from then on; generation stops
when every row has finished or after `max_new_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .artifact import artifact_weights, load_module, read_manifest


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (greedy: the lowest id among equal maxima)."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """`Generator(artifact_dir).generate(*model_inputs, max_new_tokens=32)` -> [B, T] new token ids."""

    def __init__(self, artifact: str | Path):
        artifact = Path(artifact)
        manifest = read_manifest(artifact)
        if "decode" not in manifest:
            raise ValueError(f"{artifact} was built without `decode:`; rebuild with `decode: {{policy: static}}`")
        weights = artifact_weights(artifact)  # one copy in memory for both programs
        self.prefill = load_module(artifact, "prefill.pt2", weights)
        self.step = load_module(artifact, "decode.pt2", weights)
        self.layers = len(manifest["decode"]["cache_lengths"])
        self.position_offset = manifest["decode"]["position_offset"]
        self.position_layer = manifest["decode"].get("position_from_layer")  # absent: built before it existed
        self.signature = manifest.get("signature")  # the prefill takes the model program's inputs
        lock = yaml.safe_load((artifact / "spec.lock.yaml").read_text())
        from .adapters import adapter_for
        from .models import model_config

        config = model_config(lock["model"], artifact)
        text = getattr(config, "text_config", config)
        self.eos_token_id = getattr(text, "eos_token_id", None)
        self.pad_token_id = getattr(text, "pad_token_id", None) or 0
        self.adapter = adapter_for(config)

    @torch.no_grad()
    def prefill_caches(self, *inputs):
        """(last-position logits [B, V], keys, values, valid) with per-layer lists."""
        out = self.prefill(*inputs)
        n = self.layers
        logits = out[0][:, -1]
        return logits, list(out[1:1 + n]), list(out[1 + n:1 + 2 * n]), list(out[1 + 2 * n:1 + 3 * n])

    @torch.no_grad()
    def generate(self, *inputs, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
                 eos_token_id: int | None = -1, return_logits: bool = False, **model_inputs):
        """inputs: the model's inputs (input_ids, attention_mask[, pixel_values]), left-padded, given
        positionally or by name (a processor's output: `generate(**processor(...), max_new_tokens=8)`).
        eos_token_id: -1 = the model config's, None = never stop early.
        Returns [B, T] token ids, or (ids, [B, T, V] logits each token was chosen from)."""
        eos = self.eos_token_id if eos_token_id == -1 else eos_token_id
        if self.signature is not None:
            from .signature import check_inputs

            weight = next(iter(self.prefill.parameters()), None)
            inputs = check_inputs(self.signature, inputs, model_inputs, weight.device if weight is not None else None)
        elif model_inputs:
            raise ValueError("this artifact records no input signature: give its inputs positionally")
        input_ids = inputs[0]
        batch, seq_len = input_ids.shape
        generator = None
        if sampling.do_sample:
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(0 if sampling.seed is None else sampling.seed)
        logits, keys, values, valid = self.prefill_caches(*inputs)
        valid = [v.expand(batch, -1) for v in valid]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens, scores = [], []
        # the next position after the last token's: the prompt length the first layer after the last
        # renumbering stage saw (right-aligned ragged rows share it), else counted at build time
        position = keys[self.position_layer].shape[2] if self.position_layer is not None else seq_len - self.position_offset
        for step in range(max_new_tokens):
            scores.append(logits)
            token = next_tokens(logits, sampling, generator)
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            tokens.append(token)
            if eos is not None:
                finished |= token == eos
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            positions = torch.full((batch, 1), position + step, dtype=torch.long, device=input_ids.device)
            out = self.step(token[:, None], positions, keys, values, valid)
            logits = out[0]
            n = self.layers
            keys = [torch.cat([k, new], dim=2) for k, new in zip(keys, out[1:1 + n])]
            values = [torch.cat([v, new], dim=2) for v, new in zip(values, out[1 + n:1 + 2 * n])]
            valid = [torch.cat([v, v.new_ones((batch, 1))], dim=1) for v in valid]
        ids = torch.stack(tokens, dim=1)
        return (ids, torch.stack(scores, dim=1)) if return_logits else ids
