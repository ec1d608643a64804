"""The core's contracts with methods and artifacts.

- No module of the core names a method: methods reach the compiler through their lowerings.
- A method registered here (not in prunec) with its own score function decides the selection; a
  method asking for a signal nobody provides is refused at validation.
- An artifact whose method code changed after the build is refused by `prunec.load` and `verify`.
- One token schedule: ratio rounding per rule on exact halves; explain, the manifest, the FLOPs
  layer lengths and `eval --keep` rescaling give the same counts.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, llava_inputs, write_spec

import prunec
from prunec.errors import SpecError
from prunec.methods import MethodInfo, _METHODS, get_method, method_names, register_method, unregister_method

# modules that must work for any method (the core); method files, preset specs and docs may name them
CORE = ["passes/*.py", "prunec/semantics.py", "prunec/flops.py", "prunec/kernels/*.py", "prunec/eager_way.py",
        "prunec/ops.py", "prunec/lowering.py", "prunec/signals.py", "prunec/schedule.py", "prunec/compiler.py",
        "prunec/emit.py", "prunec/explain.py", "prunec/context.py", "prunec/candidates.py", "prunec/provenance.py",
        "prunec/diff.py", "prunec/budget.py", "prunec/spec.py", "prunec/artifact.py", "prunec/verify.py"]


def _names_in(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every identifier, attribute, import and non-docstring string in a module."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias):
            out += [(node.lineno, part) for part in (node.name.split(".") + [node.asname or ""]) if part]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.lineno, part) for part in node.module.split(".")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
    return out


def test_core_names_no_method():
    names = method_names()
    pattern = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9_])")
    files = sorted({p for glob in CORE for p in REPO.glob(glob)})
    assert len(files) > 20
    found = [f"{path.relative_to(REPO)}:{line}: {text!r}" for path in files for line, text in _names_in(path)
             if pattern.search(text)]
    assert not found, "the core names methods:\n" + "\n".join(found)


def test_name_check_catches_a_method_name(tmp_path):
    """The check above sees names in code and strings (not comments or docstrings)."""
    path = tmp_path / "m.py"
    path.write_text('"""fastv here is a docstring."""\n# tome in a comment\nif stage.method == "divprune":\n'
                    '    from prunec.methods.tome import x\n')
    texts = {text for _, text in _names_in(path)}
    assert "divprune" in texts and "tome" in texts and not any("docstring" in t for t in texts)


# --------------------------------------------------------------------------- a method from outside

def l2_norm_scores(hidden: torch.Tensor) -> torch.Tensor:
    """[B, S, D] -> [B, S]: each token's L2 norm (a score no built-in method computes)."""
    return hidden.float().norm(dim=-1)


@pytest.fixture
def toy_method():
    info = register_method(MethodInfo(
        name="toy_l2", action="prune", kind="score", signals=("hidden",), fn=l2_norm_scores,
        params_schema={"type": "object", "additionalProperties": False, "properties": {}},
        default_positions="renumber", summary="test: L2 norm of the hidden states"))
    yield info
    unregister_method("toy_l2")


SPEC_L2 = """
    prunec: 1
    name: toy-l2
    model: {builtin: tiny-llava}
    inputs: {batch: 2, seq_len: 40}
    pipeline:
      - site: projector.output
        method: toy_l2
        keep: {count: 5}
"""


def _hand_l2_reference(hf, ids, mask, pixels, n_keep):
    """The HF model with a pre-hook on the LLM keeping, per row, the n_keep image tokens with the
    largest embedding norm (ties: lower index) and every other token, written from the definition."""
    lm = hf.model.language_model
    image_id = hf.config.image_token_id

    def pre(module, args, kwargs):
        embeds, mask2d = kwargs["inputs_embeds"], kwargs["attention_mask"]
        rows = []
        for b in range(embeds.shape[0]):
            cands = [i for i in range(ids.shape[1]) if ids[b, i] == image_id]
            norms = [float(embeds[b, i].double().norm()) for i in cands]
            order = sorted(range(len(cands)), key=lambda j: (-norms[j], j))[:n_keep]
            kept = {cands[j] for j in order}
            rows.append([i for i in range(ids.shape[1]) if i not in cands or i in kept])
        index = torch.tensor(rows)
        kwargs["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        kwargs["attention_mask"] = mask2d.gather(1, index)
        kwargs["position_ids"] = None
        return args, kwargs

    handle = lm.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
    finally:
        handle.remove()


def test_registered_score_function_decides_the_selection(tmp_path, toy_method):
    from prunec.models import load_model

    spec = write_spec(tmp_path, SPEC_L2)
    plan = prunec.plan(spec)
    module = prunec.load(prunec.build(spec, tmp_path / "out"))
    hf = load_model(plan.lock["model"], plan.spec.base_dir)
    hf.set_attn_implementation("eager")
    ids, mask, pixels = llava_inputs(hf.config, pads=[0, 3, 6], seq_len=40)
    expected = _hand_l2_reference(hf, ids, mask, pixels, 5)
    actual = module(ids, mask, pixels)
    assert actual.shape == expected.shape == (3, 40 - 16 + 5, hf.config.text_config.vocab_size)
    for b, pad in enumerate([0, 3, 6]):
        torch.testing.assert_close(actual[b, pad:], expected[b, pad:], atol=1e-5, rtol=0)
    # and it is not a diversity selection or any other built-in's: DivPrune keeps other tokens here
    divprune = _hand_l2_reference(hf, ids, mask, pixels, 16)  # keep all: a different, longer sequence
    assert divprune.shape[1] != actual.shape[1]


def test_unknown_signal_is_a_spec_error(tmp_path):
    register_method(MethodInfo(
        name="toy_gaze", action="prune", kind="score", signals=("gaze",), fn=l2_norm_scores,
        params_schema={"type": "object", "additionalProperties": False, "properties": {}},
        default_positions="renumber"))
    try:
        spec = write_spec(tmp_path, SPEC_L2.replace("toy_l2", "toy_gaze"))
        with pytest.raises(SpecError) as err:
            prunec.plan(spec)
        message = str(err.value)
        assert "toy_gaze" in message and "'gaze'" in message and "no provider" in message
        assert "/pipeline/0/method" in message
    finally:
        unregister_method("toy_gaze")


# --------------------------------------------------------------------------- artifacts run as built

def swapped_attention_scores(q, k, mask, scale, is_causal, query="last"):
    """Stands in for FastV's scoring after a (simulated) upgrade of the installed prunec."""
    return torch.zeros(q.shape[0], k.shape[-2])


def test_artifact_refuses_changed_method_code(tmp_path):
    spec = write_spec(tmp_path, """
        prunec: 1
        name: fastv-code
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 40}
        pipeline:
          - site: llm.layers[0]
            method: fastv
            keep: {count: 4}
    """)
    artifact = prunec.build(spec, tmp_path / "out")
    prunec.load(artifact)  # unchanged code: loads
    original = get_method("fastv")
    _METHODS["fastv"] = dataclasses.replace(original, fn=swapped_attention_scores)
    try:
        with pytest.raises(prunec.PrunecError) as err:
            prunec.load(artifact)
        line = str(err.value)
        assert "\n" not in line and "method fastv" in line and "changed" in line and "spec.lock.yaml" in line
        from prunec.verify import verify_artifact

        report = verify_artifact(artifact)
        assert not report.ok
        assert any("method fastv's code changed" in what for passed, what in report.checks if not passed)
    finally:
        _METHODS["fastv"] = original
    assert verify_artifact(artifact).ok


def test_verify_cli_exits_1_on_changed_method_code(tmp_path):
    """The same from the command line, in a process whose registry holds a swapped method."""
    spec = write_spec(tmp_path, SPEC_L2.replace("toy_l2", "divprune").replace("toy-l2", "divprune-code"))
    artifact = prunec.build(spec, tmp_path / "out")
    script = (
        "import dataclasses, sys\n"
        "from prunec.methods import _METHODS\n"
        "_METHODS['divprune'] = dataclasses.replace(_METHODS['divprune'], fn=lambda f, n: f[:, :n, 0].long())\n"
        "from prunec.cli import main\n"
        f"sys.argv = ['prunec', 'verify', {str(artifact)!r}]\n"
        "main()\n")
    (tmp_path / "swapped_verify.py").write_text(script)
    result = subprocess.run([sys.executable, str(tmp_path / "swapped_verify.py")], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "method divprune's code changed" in result.stdout + result.stderr


# --------------------------------------------------------------------------- one token schedule

@pytest.mark.parametrize("value, half_up, half_even, floor", [
    (4.5, 5, 4, 4), (5.5, 6, 6, 5), (2.5, 3, 2, 2), (0.5, 1, 0, 0), (4.8, 5, 5, 4), (7.2, 7, 7, 7), (6.0, 6, 6, 6),
])
def test_rounding_rules_on_exact_halves(value, half_up, half_even, floor):
    from prunec.schedule import round_count

    assert (round_count(value, "half_up"), round_count(value, "half_even"), round_count(value, "floor")) == \
        (half_up, half_even, floor)


def test_rescaling_rounds_half_up_and_chains():
    from prunec.schedule import scaled_counts

    # 5 x 0.5 = 2.5 -> 3; 3 x 0.5 = 1.5 -> 2; a stage never keeps more than reaches it, nor fewer than 1
    assert scaled_counts([5, 3], 16, 0.5) == [3, 2]
    assert scaled_counts([9, 9], 4, 1.0) == [4, 4]
    assert scaled_counts([4, 0, 2], 16, 0.1) == [1, 0, 0]


def test_float_products_round_as_the_official_code_computes_them():
    from prunec.schedule import ratio_count

    # int(576 * (1 - 0.7778)) is 127 in Python (METHODS-2.md §7), round() gives 128
    assert ratio_count(1 - 0.7778, 576, "floor") == 127
    assert ratio_count(1 - 0.7778, 576, "half_even") == 128


def _one_stage(method: str, site: str, ratio: float, rounding: str | None = None) -> str:
    extra = f"\n            rounding: {rounding}" if rounding else ""
    return f"""
        prunec: 1
        name: rounding
        model: {{builtin: tiny-llava}}
        inputs: {{batch: 2, seq_len: 40}}
        pipeline:
          - site: {site}
            method: {method}
            keep: {{ratio: {ratio}}}{extra}
    """


# tiny-llava has 16 image tokens: 0.15625 x 16 = 2.5 and 0.28125 x 16 = 4.5 exactly
@pytest.mark.parametrize("method, site, ratio, rounding, kept", [
    ("fastv", "llm.layers[0]", 0.15625, None, 2),             # official: round() (half to even)
    ("fastv", "llm.layers[0]", 0.28125, None, 4),
    ("divprune", "projector.output", 0.15625, None, 2),       # official: round(SUBSET_RATIO * N)
    ("pyramiddrop", "llm.layers[0]", 0.28125, None, 4),       # official: int(N * ratio)
    ("pyramiddrop", "llm.layers[0]", 0.3, None, 4),           # 4.8 -> 4 (METHODS.md: PDrop 0.3 x 16)
    ("fastervlm", "projector.output", 0.15625, None, 3),      # prunec's half up
    ("fastv", "llm.layers[0]", 0.15625, "half_up", 3),        # the stage's override wins
    ("pyramiddrop", "llm.layers[0]", 0.3, "half_even", 5),
    ("divprune", "projector.output", 0.28125, "floor", 4),
])
def test_ratio_budgets_round_by_method_or_override(tmp_path, method, site, ratio, rounding, kept):
    plan = prunec.plan(write_spec(tmp_path, _one_stage(method, site, ratio, rounding)))
    (stage,) = plan.stages
    assert (stage.n_candidates, stage.n_keep) == (16, kept)
    assert plan.lock["pipeline"][0]["rounding"] == (rounding or get_method(method).rounding)


THREE_STAGES = """
    prunec: 1
    name: three-odd
    model: {builtin: tiny-llava}
    inputs: {batch: 2, seq_len: 40}
    pipeline:
      - site: projector.output
        method: divprune
        keep: {count: 13}
      - site: llm.layers[0]
        method: fastv
        keep: {count: 7}
      - site: llm.layers[2]
        method: fastv
        keep: {count: 3}
"""


def test_one_schedule_in_explain_manifest_flops_and_rescaling(tmp_path):
    from prunec.evals import rescale
    from prunec.explain import stage_table
    from prunec.flops import domain_lengths

    spec = write_spec(tmp_path, THREE_STAGES)
    plan = prunec.plan(spec)
    # by hand: 40 tokens, 16 image tokens; 16 -> 13 -> 7 -> 3 candidates
    expected = [(40, 37, 16, 13), (37, 31, 13, 7), (31, 27, 7, 3)]
    table = stage_table(plan)
    for (t_in, t_out, c_in, c_kept), line in zip(expected, [l for l in table.splitlines() if l[:1].isdigit()]):
        assert f"{t_in} -> {t_out}" in line and f"{c_kept}/{c_in}" in line
    artifact = prunec.build(spec, tmp_path / "out")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert [(s["tokens_in"], s["tokens_out"], s["candidates_in"], s["candidates_kept"])
            for s in manifest["stages"]] == expected
    layers = plan.adapter.domains()["llm"].num_layers
    assert domain_lengths(plan, "llm") == [(37, 13), (31, 7), (31, 7), (27, 3)][:layers]
    # eval --keep: one factor, half up, chained: keep 0.5 of 16 = 8 at the end -> factor 8/3
    data = rescale(plan.spec.data, plan, 0.5)
    counts = [entry["keep"]["count"] for entry in data["pipeline"]]
    assert counts == [16, 16, 8]  # 13 x 8/3 = 34.7 -> at most 16; 7 x 8/3 = 18.7 -> 16; 3 x 8/3 = 8
    data = rescale(plan.spec.data, plan, 0.25)
    assert [entry["keep"]["count"] for entry in data["pipeline"]] == [16, 9, 4]  # 17.3->16, 9.33->9, 4
