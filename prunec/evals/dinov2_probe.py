"""dinov2-probe: linear probes trained on unpruned DINOv2-S features ([CLS] + mean of the other
tokens, final layernorm) of sklearn digits and skimage's lfw_subset (face / not face), evaluated on
the pruned model's features of the held-out images."""
from __future__ import annotations

import torch

from . import Task, register_task

IMAGE_SIZE = 112          # 8 x 8 = 64 patches + [CLS]
LFW_HELD_OUT = 50         # of 200; a seeded split like the digits'
FIT_LIMIT: int | None = None  # training images per probe (None: the whole train split; tests use fewer)


def _features(outputs: list[torch.Tensor]) -> torch.Tensor:
    hidden = torch.cat(outputs).float()
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)


def _datasets(split: str, limit: int | None):
    from ..zoo import data

    faces = data.lfw_faces()
    order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(data.SPLIT_SEED))
    index = order[:LFW_HELD_OUT] if split == "test" else order[LFW_HELD_OUT:]
    return {"digits": data.digits("sklearn", split).head(limit),
            "lfw": data.Images(faces.images[index], faces.labels[index]).head(limit)}


def _batches(datasets, batch_size):
    from ..zoo import data

    out = []
    for name, images in datasets.items():
        for start in range(0, len(images), batch_size):
            pixels = data.pixel_values(images.images[start:start + batch_size], IMAGE_SIZE)
            out.append(((pixels,), (name, images.labels[start:start + batch_size])))
    return out


@register_task
class Dinov2Probe(Task):
    name = "dinov2-probe"
    zoo = "dinov2-s"
    summary = "linear probes on DINOv2-S features (sklearn digits, lfw faces), trained unpruned, tested pruned"

    def __init__(self):
        self._fitted = {}  # FIT_LIMIT -> {dataset: probe}

    def capture_inputs(self, model_dir):
        return {"batch": 2, "image_size": IMAGE_SIZE}

    def batches(self, model_dir, limit, batch_size):
        return _batches(_datasets("test", limit), batch_size)

    def example_count(self, labels):
        return len(labels[1])

    def fit(self, reference, model_dir):
        if FIT_LIMIT in self._fitted:
            return
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        probes = self._fitted[FIT_LIMIT] = {}
        for name, images in _datasets("train", FIT_LIMIT).items():
            features = _features(reference(_batches({name: images}, 64)))
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
            probes[name] = probe.fit(features.numpy(), images.labels.numpy())

    def metrics(self, outputs, labels, reference):
        result = {}
        for name in ("digits", "lfw"):
            picked = [i for i, (which, _) in enumerate(labels) if which == name]
            if not picked:
                continue
            features = _features([outputs[i] for i in picked])
            truth = torch.cat([labels[i][1] for i in picked])
            predicted = torch.from_numpy(self._fitted[FIT_LIMIT][name].predict(features.numpy()))
            result[f"{name}_accuracy"] = (predicted == truth).float().mean().item()
        ref = _features(reference).numpy()
        out = _features(outputs)
        result["feature_cosine"] = torch.nn.functional.cosine_similarity(out, torch.from_numpy(ref)).mean().item()
        return result
