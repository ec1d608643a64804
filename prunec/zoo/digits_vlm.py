"""digits-vlm: a real, tiny LLaVA. DINOv2-S (12x12 = 144 patch tokens at 168 px, penultimate layer,
[CLS] dropped) -> a 2-layer MLP projector (384 -> 576 -> 576, GELU) -> SmolLM2-135M-Instruct, asked
"What digit is this?" in ChatML. Only the projector is trained (`train_digits_projector.py`); its
weights ship with prunec, the tower and the LLM are rebuilt from their offline packages.

The saved directory is an ordinary HF VLM directory: a `LlavaProcessor` (resize to 168 px bicubic,
ImageNet normalisation, the image token expanded to 144, and a chat template that writes the prompt
format the projector was trained on) sits beside the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

IMAGE_SIZE = 168
QUESTION = "What digit is this? Answer with one digit."
# SmolLM2 has no image token; `<empty_output>` (id 16) is a special token chat text never produces,
# so it marks the image span (its embedding is replaced by the projected features).
IMAGE_TOKEN = "<empty_output>"
PROJECTOR_FILE = Path(__file__).parent / "weights" / "digits_vlm_projector.safetensors"
# ChatML without SmolLM2's default system block: each image item is the image token and a newline,
# as `prompt_ids` writes it (the processor expands the token to the image's patch count).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def image_tokens(vision: transformers.PretrainedConfig) -> int:
    return (IMAGE_SIZE // vision.patch_size) ** 2


def prompt_ids(tokenizer, n_image_tokens: int) -> list[int]:
    """ChatML user turn with the image then the question, and the assistant header; no system block
    (SmolLM2's template would add one silently)."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    head = tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
    tail = tokenizer(f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    return head + [image_id] * n_image_tokens + tail


def processor(tokenizer, vision: transformers.PretrainedConfig):
    """The model's HF processor: what `pixel_values` (data.py) computes, from any PIL image."""
    from .data import IMAGENET_MEAN, IMAGENET_STD

    images = transformers.CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False, resample=3,  # bicubic
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), do_convert_rgb=True)
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def digit_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer(str(d), add_special_tokens=False).input_ids for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("expected the digits 0-9 to be single tokens")
    return [i[0] for i in ids]


class Projector(torch.nn.Module):
    """LLaVA's projector layout (linear_1, GELU, linear_2), so its state dict loads into
    `multi_modal_projector` unchanged."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear_1 = torch.nn.Linear(vision_hidden, text_hidden)
        self.act = torch.nn.GELU()
        self.linear_2 = torch.nn.Linear(text_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def llava_config(vision: transformers.PretrainedConfig, text: transformers.PretrainedConfig,
                 image_token_id: int) -> transformers.LlavaConfig:
    return transformers.LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=image_tokens(vision), tie_word_embeddings=getattr(text, "tie_word_embeddings", False))


@torch.no_grad()
def tower_at_image_size(tower: transformers.Dinov2Model) -> transformers.Dinov2Model:
    """The same tower with its position table resampled once to IMAGE_SIZE, by the model's own
    interpolation (so features are unchanged) and the config saying IMAGE_SIZE: the LLaVA config
    then states the real image-token count instead of the 518 px table's."""
    grid = IMAGE_SIZE // tower.config.patch_size
    dummy = torch.zeros(1, grid * grid + 1, tower.config.hidden_size)
    positions = tower.embeddings.interpolate_pos_encoding(dummy, IMAGE_SIZE, IMAGE_SIZE)
    config = transformers.Dinov2Config(**{**tower.config.to_dict(), "image_size": IMAGE_SIZE})
    resized = transformers.Dinov2Model(config)
    state = dict(tower.state_dict(), **{"embeddings.position_embeddings": positions})
    resized.load_state_dict(state)
    return resized.eval()


def assemble(dinov2_dir: Path, smollm2_dir: Path, projector_file: Path = PROJECTOR_FILE):
    """(LlavaForConditionalGeneration with the trained projector, its processor)."""
    from safetensors.torch import load_file

    tower = tower_at_image_size(transformers.Dinov2Model.from_pretrained(dinov2_dir, local_files_only=True))
    llm = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    config = llava_config(tower.config, llm.config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    model.model.multi_modal_projector.load_state_dict(load_file(str(projector_file)))
    return model.eval(), processor(tokenizer, tower.config)
