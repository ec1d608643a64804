"""Where models come from: a named built-in config with seeded random weights, a config file, a
local `from_pretrained` directory, or an offline zoo entry (`prunec.zoo`). Nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import transformers

from .errors import BuildError

# Tiny configs: small enough to capture in about a second, shaped like the real families
# (GQA in the Llama text model, [CLS] in the vision towers, an image span in LLaVA).
_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               image_size=28, patch_size=7)

BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": _LLAMA,
    "tiny-llava": dict(
        model_type="llava",
        vision_config=dict(model_type="clip_vision_model", projection_dim=32, **_VISION),
        text_config=_LLAMA,
        image_token_id=255,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    ),
    # anyres: 28 px crops on grids of 1x2, 2x1, 2x2, 1x3 and 3x1 crops
    "tiny-llava-next": dict(
        model_type="llava_next",
        vision_config=dict(model_type="clip_vision_model", projection_dim=32, **_VISION),
        text_config=_LLAMA,
        image_token_id=255,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]],
    ),
    "tiny-vit": dict(model_type="vit", **_VISION),
    "tiny-clip-vision": dict(model_type="clip_vision_model", **_VISION),
    "tiny-dinov2": dict(model_type="dinov2", **_VISION),
    "tiny-bert": dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, vocab_size=128, max_position_embeddings=256),
}

# transformers class that holds each family's weights.
_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "vit": "ViTModel",
    "clip_vision_model": "CLIPVisionModel",
    "dinov2": "Dinov2Model",
    "bert": "BertModel",
}


def _config_from_dict(raw: dict[str, Any]) -> transformers.PretrainedConfig:
    raw = dict(raw)
    model_type = raw.pop("model_type")
    for key in ("vision_config", "text_config"):
        if isinstance(raw.get(key), dict):
            raw[key] = _config_from_dict(raw[key])
    return transformers.AutoConfig.for_model(model_type, **raw)


def _model_class(config: transformers.PretrainedConfig):
    name = _MODEL_CLASSES.get(config.model_type)
    if name is None:
        raise BuildError(f"no model class known for model_type {config.model_type!r}; "
                         f"supported: {', '.join(sorted(_MODEL_CLASSES))}")
    return getattr(transformers, name)


def builtin_config(name: str) -> transformers.PretrainedConfig:
    return _config_from_dict(BUILTIN_CONFIGS[name])


def _pretrained_dir(source: dict[str, Any], base_dir: Path) -> Path:
    if "zoo" in source:
        from . import zoo

        try:
            return zoo.prepare(source["zoo"])
        except (KeyError, ModuleNotFoundError) as exc:
            raise BuildError(str(exc).strip('"')) from None
    return base_dir / source["path"]


def pretrained_dir(source: dict[str, Any], base_dir: Path) -> Path | None:
    """The spec's from_pretrained directory (a `path` or a zoo entry), or None for configs."""
    return _pretrained_dir(source, base_dir) if ("path" in source or "zoo" in source) else None


def model_config(source: dict[str, Any], base_dir: Path) -> transformers.PretrainedConfig:
    """The config of the spec's model, without building weights (used by semantic validation)."""
    if "builtin" in source:
        return builtin_config(source["builtin"])
    if "config" in source:
        return _config_from_dict(json.loads((base_dir / source["config"]).read_text()))
    return transformers.AutoConfig.from_pretrained(_pretrained_dir(source, base_dir), local_files_only=True)


def load_model(source: dict[str, Any], base_dir: Path) -> torch.nn.Module:
    """Build (seeded random weights) or load (local directory) the spec's model, in eval mode."""
    dtype = getattr(torch, source.get("dtype", "float32"))
    attn = source.get("attn_implementation", "sdpa")
    config = model_config(source, base_dir)
    if "path" in source or "zoo" in source:
        model = _model_class(config).from_pretrained(_pretrained_dir(source, base_dir), local_files_only=True,
                                                     dtype=dtype, attn_implementation=attn)
    else:
        config._attn_implementation = attn
        for sub in ("vision_config", "text_config"):
            if getattr(config, sub, None) is not None:
                getattr(config, sub)._attn_implementation = attn
        with torch.random.fork_rng():
            torch.manual_seed(int(source.get("seed", 0)))
            model = _model_class(config)(config)
        model = model.to(dtype)
    return model.eval()


def model_identity(model: torch.nn.Module) -> str:
    """sha256 over the config and every parameter/buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
