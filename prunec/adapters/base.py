"""What the compiler needs to know about a model family, and nothing about any pruning method.

An adapter says where the layers are (module paths that the captured graph's `nn_module_stack`
names), which tokens may be pruned (the *candidates*: image tokens, patches), which are protected
([CLS], text), which module produces the rotary tables, how to build example inputs and which of
their axes are dynamic. Module paths are relative to the wrapper, whose HF model lives at `hf`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.export import Dim


@dataclass(frozen=True)
class Domain:
    """A stack of layers that share one token sequence (the LLM, or a vision tower)."""

    name: str                 # "llm" | "vision" | "encoder": the prefix of `<name>.layers[i]` sites
    layers_path: str          # module path of the layer ModuleList inside the wrapper, e.g. hf.model.layers
    num_layers: int
    rotary_path: str | None   # module whose outputs depend on positions (cos/sin), if any
    norm_path: str | None = None  # the norm after the last layer (decoders), for signals that read it


@dataclass(frozen=True)
class ExampleShape:
    batch: int
    seq_len: int | None
    image_size: int | None
    images: int = 1           # images per row (multimodal families)


class Adapter:
    """Base class. Subclasses set the class attributes and implement the hooks below."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    span: ClassVar[str]                               # name of the prunable tokens, e.g. "image", "text"
    protectable: ClassVar[tuple[str, ...]] = ()       # values allowed in a stage's `protect:`
    output_sites: ClassVar[dict[str, str]] = {}       # e.g. {"projector.output": "llm"}
    needs_seq_len: ClassVar[bool] = False
    needs_image: ClassVar[bool] = False
    generates: ClassVar[bool] = False                 # a causal LM: decode cost and KV cache apply
    poolings: ClassVar[tuple[str, ...]] = ()          # `output.pooling` values the wrapper offers
    image_domains: ClassVar[tuple[str, ...]] = ()     # domains whose candidates are image tokens (count varies
                                                      # with the images per row)
    # (input module, block module) of each residual sub-block, relative to a layer: the block's
    # input is the first module's output (a norm), its output the block's, before the residual add
    sub_blocks: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: Any):
        self.config = config

    # -- model facts -------------------------------------------------------------------------
    def domains(self) -> dict[str, Domain]:
        raise NotImplementedError

    def wrap(self, model: torch.nn.Module, output: dict | None = None) -> torch.nn.Module:
        """An nn.Module with a positional forward over `example_inputs` returning one tensor, shaped
        by the spec's `output:` mapping (`logits: last` for causal families, `pooling` for encoders)."""
        raise NotImplementedError

    def example_inputs(self, shape: ExampleShape, seed: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def dynamic_shapes(self, min_tokens: int) -> tuple[Any, ...]:
        """torch.export dynamic shapes; the token axis must admit at least `min_tokens` (a pruned
        sequence keeps at least 2 tokens, so a pipeline dropping D tokens needs D + 2)."""
        raise NotImplementedError

    def input_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def default_image_size(self) -> int | None:
        return None

    def input_rules(self, inputs: dict[str, Any]) -> list[dict]:
        """Run-time facts about the inputs beyond dtypes and shapes, as data for `prunec.signature`:
        `values` (an input's value range), `count_per_row` (a token's count in each row),
        `rows_per_row` (an input's leading size per row of another)."""
        return []

    def seq_len_range(self) -> tuple[int, int]:
        """Sequence lengths the model accepts (text families)."""
        return 2, self.config.max_position_embeddings

    def layer_dims(self, domain: str) -> tuple[int, int, int]:
        """(hidden d, FFN width m, FFN matrices: 3 for SwiGLU, 2 for a plain MLP) for FLOPs."""
        return self.config.hidden_size, self.config.intermediate_size, 2

    def decoder(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Families with `generates`: the Llama-style decoder (embed_tokens, layers, norm, rotary_emb)
        and the LM head, for the decode step."""
        raise NotImplementedError(f"family {self.family} does not generate")

    def attention_dims(self, domain: str) -> tuple[int, int]:
        """(query/output width heads x head_dim, key/value width kv_heads x head_dim) for FLOPs."""
        return self.config.hidden_size, self.config.hidden_size

    def fixed_macs(self, inputs: dict[str, Any]) -> dict[str, int]:
        """MACs of the parts no site can prune (e.g. a VLM's vision tower), by part, per row."""
        return {}

    def tokens_at_input(self, domain: str, inputs: dict[str, Any]) -> int:
        """Sequence length a domain's layers see at the spec's example shapes, before pruning."""
        return inputs["seq_len"]

    # -- candidates --------------------------------------------------------------------------
    def candidate_mask(self, graph: fx.Graph, site_value: fx.Node, protect: tuple[str, ...],
                       cut: fx.Node) -> fx.Node:
        """A node computing the [B, S] bool candidate mask, inserted after `cut` or, when it derives
        from the inputs, right after them (then later stages reuse it and earlier cuts gather it)."""
        raise NotImplementedError

    def initial_candidates_from_config(self, inputs: dict[str, Any], protect: tuple[str, ...]) -> int:
        """Candidates per row at the spec's example shapes, before any stage prunes."""
        raise NotImplementedError

    def patch_positions(self, inputs: tuple, row: int) -> tuple[list[int], int]:
        """(sequence positions of the image patches in raster order, sequence length) for one row
        of example inputs: how keep indices map back onto the image."""
        raise NotImplementedError(f"family {self.family} has no image patches")

    def validity(self, graph: fx.Graph) -> fx.Node | None:
        """A [B, S] bool node, True on real tokens and False on padding, built from the
        `attention_mask` input right after it; None for families without one."""
        mask = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "attention_mask"), None)
        if mask is None:
            return None
        for user in mask.users:  # one node serves every stage
            if user.target is torch.ops.aten.ne.Scalar and user.args[1] == 0:
                return user
        with graph.inserting_after(mask):
            valid = graph.call_function(torch.ops.aten.ne.Scalar, (mask, 0))
        with mask.meta["val"].fake_mode:
            valid.meta["val"] = torch.empty_like(mask.meta["val"], dtype=torch.bool)
        return valid

    def candidates_vary(self, inputs: dict[str, Any]) -> bool:
        """Whether rows may hold different numbers of candidates (then `image_domains` stages resolve
        their budgets per row at run time): with `inputs.images_per_row`, or always where image sizes
        set the token count."""
        return "images_per_row" in inputs

    def tokens_for_image(self, size: tuple[int, int], protect: tuple[str, ...]) -> tuple[int, int] | None:
        """(image tokens, candidates among them) an image of `size` (height, width) gets, for families
        whose token count follows the image size; None for the others."""
        return None

    def derive_inputs(self) -> dict | None:
        """How a loaded artifact derives the program's inputs from what users pass (a processor's
        output), recorded in the signature; None when they are the same."""
        return None

    def vision_feature_layer(self) -> int:
        """For a pre-LLM site: the 0-indexed vision layer whose output the LLM receives."""
        raise ValueError(f"family {self.family} has no vision tower feeding a later domain")

    def vision_attention(self, gm: fx.GraphModule, layer: int) -> tuple[fx.Node, int]:
        """For a pre-LLM site: (vision layer `layer`'s sdpa call, how many leading tokens of that
        attention are not candidates, e.g. a [CLS] the projector never sees)."""
        raise ValueError(f"family {self.family} has no vision tower feeding a later domain")

    def patch_scores(self, b, patches: fx.Node) -> fx.Node:
        """[B, S] scores over the site's tokens from `patches` ([images, patches]: one value per
        vision-tower patch, e.g. a [CLS] attention row), placed on the image tokens in order."""
        per_row = -1 if b.stage.ragged else b.n_candidates  # -1: rows hold different counts
        return b.add("score", torch.ops.prunec.scatter_candidates.default, (patches, b.candidates, per_row))

    def projector_input(self, gm: fx.GraphModule) -> fx.Node:
        """VLMs: the vision features [images, patches, width] the projector reads."""
        raise ValueError(f"family {self.family} has no vision projector")

    def check_candidates(self, gm: fx.GraphModule, expected: int) -> None:
        """Raise ValueError if the captured graph disagrees with the config-derived count."""

    def output_cut(self, gm: fx.GraphModule, site: str) -> tuple[fx.Node, fx.Node]:
        """For a non-layer site: (the node after which to cut, the [B, S, D] value at the cut)."""
        raise NotImplementedError


LLAMA_SUB_BLOCKS = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))


def llama_attention_dims(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * head_dim, kv_heads * head_dim


def batch_dim() -> Dim:
    return Dim("batch", min=1, max=4096)


def random_token_ids(shape: tuple[int, int], vocab_size: int, avoid: set[int], generator) -> torch.Tensor:
    """Token ids drawn uniformly from the vocabulary minus `avoid` (special and image tokens)."""
    allowed = torch.tensor([i for i in range(vocab_size) if i not in avoid])
    return allowed[torch.randint(len(allowed), shape, generator=generator)]


def token_rules(vocab_size: int) -> list[dict]:
    return [{"kind": "values", "input": "input_ids", "min": 0, "max": vocab_size - 1, "what": "token ids"},
            {"kind": "values", "input": "attention_mask", "min": 0, "max": 1, "what": "mask values"}]


def last_logits(output: dict | None) -> bool:
    return (output or {}).get("logits") == "last"


def module_path(node: fx.Node) -> str:
    """Innermost module path recorded for an exported node ('' when none)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


class TextAdapter(Adapter):
    """Shared inputs of text-only families: (input_ids, attention_mask), dynamic batch and sequence."""

    needs_seq_len = True

    def special_token_ids(self) -> set[int]:
        """Ids never drawn for example text (padding, BOS/EOS)."""
        return {getattr(self.config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")} - {None}

    def input_names(self):
        return ("input_ids", "attention_mask")

    def input_rules(self, inputs):
        return token_rules(self.config.vocab_size)

    def example_inputs(self, shape: ExampleShape, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ids = random_token_ids((shape.batch, shape.seq_len), self.config.vocab_size, self.special_token_ids(), gen)
        return ids, torch.ones_like(ids)

    def dynamic_shapes(self, min_tokens):
        batch, seq = batch_dim(), Dim("seq", min=max(2, min_tokens), max=self.config.max_position_embeddings)
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
