"""One copy of the weights per artifact (prunec/weights.py).

- a `decode:` artifact (model, prefill and decode programs) of a model whose weights dominate its
  graph is at most 1.1x the model's own safetensors file (`save_pretrained`), where three programs
  with their own weights would be about 3x;
- the three programs hold their tensors from one load of the weights file (the same storage), and
  the generator's tokens equal a keep-everything build's model run greedily token by token
  (generation correctness itself is tests/test_generation.py's);
- a weights file that does not fit its programs, or a program file taken out of its artifact,
  gives one clear ArtifactError.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import prunec
from conftest import write_spec
from prunec.artifact import ArtifactError, artifact_weights, load_program
from prunec.models import load_model

# weights (16k x 256 embeddings, untied, plus 2 layers: 9.7M parameters) dwarf the graph
CONFIG = {"model_type": "llama", "vocab_size": 16000, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    (root / "llama.json").write_text(json.dumps(CONFIG))
    spec = write_spec(root, """
        prunec: 1
        name: shared-weights
        model: {config: llama.json, seed: 3}
        inputs: {batch: 2, seq_len: 24}
        output: {logits: last}
        decode: {policy: static}
        pipeline:
          - {site: 'llm.layers[0]', method: fastv, keep: {count: 6}}
    """)
    return spec, prunec.build(spec, root / "out")


def test_decode_artifact_is_at_most_1_1x_the_models_weights(artifact, tmp_path):
    spec, path = artifact
    plan = prunec.plan(spec)
    model = load_model(plan.lock["model"], plan.spec.base_dir)
    model.save_pretrained(tmp_path / "hf")
    weights_on_disk = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    artifact_size = sum(f.stat().st_size for f in path.iterdir())
    assert {"model.pt2", "prefill.pt2", "decode.pt2"} <= {f.name for f in path.iterdir()}
    assert artifact_size <= 1.1 * weights_on_disk, (artifact_size, weights_on_disk)


def test_programs_share_one_load_of_the_weights(artifact):
    _, path = artifact
    weights = artifact_weights(path)
    model, decode = load_program(path, "model.pt2", weights), load_program(path, "decode.pt2", weights)
    lm_head = [t for n, t in model.state_dict.items() if n.endswith("lm_head.weight")]
    step_head = [t for n, t in decode.state_dict.items() if n.endswith("lm_head.weight")]
    assert len(lm_head) == len(step_head) == 1
    assert lm_head[0].untyped_storage().data_ptr() == step_head[0].untyped_storage().data_ptr()


def test_generation_from_shared_weights_follows_the_pruned_model_greedily(artifact):
    """Each generated token is the argmax of the pruned model program's last logits on the prompt
    extended by the tokens before it, for the first token (the decode step's later tokens are
    covered against HF references in test_generation)."""
    _, path = artifact
    generator = prunec.load_generator(path)
    ids = torch.randint(3, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tokens = generator.generate(ids, mask, max_new_tokens=1, eos_token_id=None)
    logits = prunec.load(path)(ids, mask)
    assert torch.equal(tokens[:, 0], logits[:, -1].argmax(-1))


def _copy(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copytree(path, copy)
    return copy


def _rewrite_weights(copy, edit):
    """Replace the weights file by an edited one and record its digest, as a careless tool would."""
    from safetensors.torch import load_file, save_file

    from prunec.files import file_sha256

    tensors = edit(load_file(str(copy / "weights.safetensors")))
    save_file(tensors, str(copy / "weights.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = file_sha256(copy / "weights.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_missing_tensor_in_weights_file_is_named(artifact, tmp_path):
    copy = _copy(artifact[1], tmp_path)
    _rewrite_weights(copy, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.mlp.up_proj.weight")})
    with pytest.raises(ArtifactError, match=r"no stored tensor for '.*layers\.1\.mlp\.up_proj\.weight'"):
        prunec.load(copy)


def test_wrong_shape_in_weights_file_is_named(artifact, tmp_path):
    copy = _copy(artifact[1], tmp_path)

    def shrink(tensors):
        name = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight"))
        return {**tensors, name: tensors[name][:-1].clone()}

    _rewrite_weights(copy, shrink)
    with pytest.raises(ArtifactError, match=r"q_proj\.weight' is \(255, 256\) .* expects \(256, 256\)"):
        prunec.load(copy)


def test_program_taken_out_of_its_artifact_says_where_its_weights_are(artifact, tmp_path):
    shutil.copyfile(artifact[1] / "model.pt2", tmp_path / "alone.pt2")
    with pytest.raises(ArtifactError, match="holds no weights .* load the artifact directory"):
        prunec.load(tmp_path / "alone.pt2")
    assert isinstance(prunec.load(artifact[1] / "model.pt2"), torch.nn.Module)  # inside its artifact it loads


def test_a_program_next_to_someone_elses_manifest_is_loaded_on_its_own(artifact, tmp_path):
    (tmp_path / "manifest.json").write_text('{"name": "not prunec"}')
    shutil.copyfile(artifact[1] / "model.pt2", tmp_path / "alone.pt2")
    with pytest.raises(ArtifactError, match="holds no weights"):
        prunec.load(tmp_path / "alone.pt2")


class _Expanded(torch.nn.Module):
    """A buffer whose strides overlap (stride 0, as `expand` gives) and a weight used twice."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("offsets", torch.arange(4.0).expand(3, 4))

    def forward(self, x):
        return self.linear(x) + self.offsets.sum(0)


def test_overlapping_strides_round_trip_and_holders_are_restored(tmp_path):
    from prunec.weights import bind, detached, load_weights

    module = _Expanded().eval()
    program = torch.export.export(module, (torch.randn(2, 4),))
    before = {name: tensor for name, tensor in program.state_dict.items()}
    with detached({"a.pt2": program, "b.pt2": program}) as shared:  # the same program twice
        torch.export.save(program, tmp_path / "p.pt2")
        assert all(t.device.type == "meta" for t in program.state_dict.values())
    assert all(program.state_dict[n] is t for n, t in before.items())  # originals back, not placeholders
    shared.save(tmp_path / "w.safetensors")
    loaded = torch.export.load(tmp_path / "p.pt2")
    bind(loaded, shared.bindings["a.pt2"], load_weights(tmp_path / "w.safetensors"))
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded.module()(x), module(x), rtol=0, atol=0)
