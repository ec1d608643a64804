"""minilm-sim: all-MiniLM-L6-v2 sentence embeddings (mean pooling, as sentence-transformers computes
them) of the pruned encoder against the unpruned one.

Every example is exactly WINDOW tokens ([CLS], WINDOW - 2 word pieces, [SEP]) and unpadded, so a
keep ratio removes the same share of every row (with padding, budgets count against the padded
length and short rows would lose nothing): windows cut from gensim's Lee news corpus, and the
gensim polarity sentences at least that long, truncated. Metrics: mean cosine of pruned vs unpruned
embeddings; retrieval@1 (a pruned news window's nearest unpruned embedding is its own); polarity
accuracy of a logistic probe on unpruned embeddings, cross-fitted (each of 5 folds predicted by a
probe trained on the other 4) and applied to the embeddings under test.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from . import Task, register_task

WINDOW = 24
FOLDS = 5


@lru_cache(maxsize=2)
def _examples(model_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{dataset: (ids [N, WINDOW], labels [N])}; news windows ordered window-major (the first 300
    are one per document), labels there are the window's index."""
    import transformers

    from ..zoo import data

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    body = WINDOW - 2

    def framed(pieces: list[int]) -> list[int]:
        return [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]

    texts, labels = data.polarity_sentences()
    polarity = [(framed(ids[:body]), int(y)) for text, y in zip(texts, labels)
                if len(ids := tokenizer(text, add_special_tokens=False).input_ids) >= body]
    order = torch.randperm(len(polarity), generator=torch.Generator().manual_seed(data.SPLIT_SEED)).tolist()
    polarity = [polarity[i] for i in order]  # the file lists one label, then the other; --limit takes both
    docs = [tokenizer(doc, add_special_tokens=False).input_ids for doc in data.news_documents()]
    news = [framed(doc[start:start + body]) for start in range(0, max(map(len, docs)), body)
            for doc in docs if start + body <= len(doc)]
    news = list(dict.fromkeys(map(tuple, news)))  # the corpus repeats some passages
    return {"polarity": (torch.tensor([ids for ids, _ in polarity]), torch.tensor([y for _, y in polarity])),
            "news": (torch.tensor(news), torch.arange(len(news)))}


def _cross_fitted_accuracy(train_features: torch.Tensor, test_features: torch.Tensor, labels: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = labels.numpy()
    folds = StratifiedKFold(n_splits=min(FOLDS, int(min(y.sum(), len(y) - y.sum()))), shuffle=True, random_state=0)
    correct = 0
    for train, test in folds.split(train_features.numpy(), y):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        probe.fit(train_features.numpy()[train], y[train])
        correct += int((probe.predict(test_features.numpy()[test]) == y[test]).sum())
    return correct / len(y)


@register_task
class MiniLMSim(Task):
    name = "minilm-sim"
    zoo = "minilm"
    summary = (f"all-MiniLM-L6-v2 mean-pooled embeddings of {WINDOW}-token texts: cosine to unpruned, "
               "retrieval@1 (news), polarity probe accuracy")
    output = {"pooling": "mean"}

    def capture_inputs(self, model_dir):
        return {"batch": 2, "seq_len": WINDOW}

    def batches(self, model_dir, limit, batch_size):
        out = []
        for name, (ids, labels) in _examples(model_dir).items():
            ids, labels = ids[:limit], labels[:limit]
            for i in range(0, len(labels), batch_size):
                chunk = ids[i:i + batch_size]
                out.append(((chunk, torch.ones_like(chunk)), (name, labels[i:i + batch_size])))
        return out

    def example_count(self, labels):
        return len(labels[1])

    def metrics(self, outputs, labels, reference):
        def by_dataset(tensors, name):
            picked = [t for t, (which, _) in zip(tensors, labels) if which == name]
            return torch.cat(picked).double() if picked else torch.empty(0, 0, dtype=torch.float64)

        result = {"cosine": F.cosine_similarity(torch.cat(outputs).double(), torch.cat(reference).double()).mean().item()}
        news, news_ref = by_dataset(outputs, "news"), by_dataset(reference, "news")
        if len(news):
            nearest = (F.normalize(news, dim=-1) @ F.normalize(news_ref, dim=-1).T).argmax(dim=1)
            result["retrieval_at_1"] = (nearest == torch.arange(len(news))).double().mean().item()
        polarity = [y for which, y in labels if which == "polarity"]
        if polarity:
            result["polarity_accuracy"] = _cross_fitted_accuracy(by_dataset(reference, "polarity").float(),
                                                                 by_dataset(outputs, "polarity").float(),
                                                                 torch.cat(polarity))
        return result
