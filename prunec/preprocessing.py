"""The processor an artifact ships: the model directory's tokenizer and image-processor files,
copied at build time (`emit.copy_preprocessing`), loaded from the artifact alone."""
from __future__ import annotations

from pathlib import Path

from .artifact import read_manifest
from .errors import PrunecError


def load_processor(artifact: Path):
    """AutoProcessor for an artifact with an image processor, else AutoTokenizer."""
    import transformers

    files = read_manifest(artifact).get("preprocessing", {}).get("files", [])
    if not any(name.startswith("tokenizer") for name in files):
        raise PrunecError(f"{artifact} ships no tokenizer or processor: its model was built from a config, or its "
                          "directory had none (prunec copies preprocessor_config.json, tokenizer*.json, "
                          "chat_template.* ... from a `model: {path: ...}` or zoo directory)")
    if {"preprocessor_config.json", "processor_config.json"} & set(files):
        return transformers.AutoProcessor.from_pretrained(artifact, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(artifact, local_files_only=True)
