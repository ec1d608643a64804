"""Method defaults for the hook references, written here from ../shared/METHODS.md (each value with
its section and line), never read from prunec: a reference that took prunec's defaults would agree
with any default prunec chose. `TEST_CHOICES` holds values for parameters whose official value the
documents do not state; they are this test suite's choices, written out.
"""

OFFICIAL_DEFAULTS = {
    "a2sf": {
        # METHODS.md §1.9(d) L358: "README example: `total_budget=256`, `forgetting_factor=0.95`."
        # (caveat L359: "The paper tuned α per model/task (exact values unclear).")
        "forgetting": 0.95,
        # METHODS.md §1.9(c) L354: "Always keep the last `recent_budget = 16` tokens."
        "recent": 16,
    },
    "aim": {
        # METHODS.md §1.7(c) L293: "`M = softmax(logits / τ)` with τ = 0.1."
        "temperature": 0.1,
        # METHODS.md §1.7(c) L294: "PageRank: `s⁰ = 1/N` (per head); `s ← s·M` for 5 iterations, damping 0."
        "iterations": 5,
    },
    "catp": {
        # METHODS.md §1.17(d) L533: "λ₁ = 0.7, λ₂ = 0.6."  (λ₁ = weight of F_align, §1.17(b))
        # (source is the paper full text; §1.17(g): official repo "not found")
        "alignment": 0.7,
    },
    "catp_context": {
        # METHODS.md §1.17(d) L533: "λ₁ = 0.7, λ₂ = 0.6."  (λ₂ weights cos(h_c, v̄_q) in S_ctx, §1.17(b))
        "similarity": 0.6,
    },
    "dart": {
        # METHODS-2.md §2(d) L112: "Common: `K = 2` (`--pruned_layer 2`), `p_img = p_txt = 4`, ..."
        "pivots_image": 4,
        "pivots_text": 4,
    },
    "pool": {
        # METHODS-2.md §4.2 L182: "`F.adaptive_avg_pool2d` (or `max`, env `POOLING_MODE`)"
        "mode": "avg",
    },
    "vispruner": {
        # METHODS-2.md §3(d) L148: "`--important_ratio` default 0.5 (`model_vqa_loader.py`)."
        "important_ratio": 0.5,
        # METHODS-2.md §3(c) L138: "Duplicate removal by repeated bipartite matching, at most 8 tokens per round"
        "per_round": 8,
        # METHODS-2.md §3(e): the CLIP tower's [CLS] row ranks importance; the SigLIP path is the [CLS]-free one
        "importance": "cls",
    },
    "fastv": {
        # METHODS.md §2.1(b) L588: "Takes the row of the last token only." (official code);
        # L590: "the paper's rule and the shipped rule differ: all queries vs last query."
        # Also METHODS.md §5 item 2; METHODS-2.md §6.4 L295 (LightCompress port: last token).
        "query": "last",
    },
    "hiprune": {
        # METHODS.md §1.11(d) L395: "LLaVA-1.5: `HIPRUNE_RETENTION` ∈ {192, 128, 64}, α = 0.1, object layer l = 9."
        # (same α = 0.1 for LLaVA-NeXT and Qwen2.5-VL, L396-397)
        "alpha": 0.1,
    },
    "holov": {
        # METHODS.md §1.13(d) L452: "in code, C = 16 crops and N̂ = 64 (hard-coded in `llava_arch.py`)."
        "crops": 16,
        # METHODS.md §1.13(b) L442: "In the code: `token_score = 1000·A + α·(V · mean|1000·A| / mean|V|)` with α = 0.09."
        "alpha": 0.09,
    },
    "sparsevlm_recycle": {
        # METHODS.md §2.3(c) L650: "take the top 30% (+1) of the deleted tokens by score;"
        "ratio": 0.3,
    },
    "tome": {
        # METHODS.md §2.2(c) L619: "**Proportional attention:** add `log(size)` to the attention logits in later blocks."
        # and §4 table L803: "size-weighted merge + prop. attn". (Part of the official rule; the doc
        # names no on/off switch, so True = "as described".)
        "proportional_attention": True,
    },
    "ttv": {
        # METHODS.md §1.1(b) L147: "The code uses `1 − cos` without the absolute value. The `|cos|`
        # variant is present but commented out." (paper: 1 − |cos|; see also §5 item 1)
        "cos": "signed",
    },
    "vflowopt": {
        # METHODS.md §1.16(d) L502: "10% budget: t = 39.26, α_v = 0, a (`illava_vit_m`) = 17.39, ViT keep
        # r = 0.1166, LLM keep ratios [1.0, 0.6011]."  (values for the 10% config; the 25%/50% configs
        # exist but their t and a are not given in the document)
        "threshold": 39.26,
        # METHODS.md §1.16(d) L502 (same quote): "a (`illava_vit_m`) = 17.39"
        "cell": 17.39,
        # METHODS.md §1.16(d) L504: "The entropy weight is 0 in all released configs."; §5 item 7 L824.
        "entropy_weight": 0.0,
    },
}

# The documents state no official value for these (METHODS.md is silent or gives ranges); the
# references use the values written here.
TEST_CHOICES = {
    # METHODS-2.md §1(b): the official relevance is the negated CLIP cosine, which needs CLIP's text tower;
    # §1(d) L84: the OpenVINO port's LLM-embedding relevance is "un-negated". The tests use that form.
    "cdpruner": {"sign": 1},
    "fuse": {"fusion": "weighted_sum", "normalize": "sum"},  # TransPrune's sum-normalised TTV + IGA, §1.1 L153
    "fopru": {"strategy": "rank"},
    "recoverable": {"neighbours": 20, "heads": "joint"},
    "todre": {"pivot": "first"},
    "zero_tprune": {"iterations": 10},  # §1.6: 5-10 iterations in middle layers
    "zero_tprune_si": {"iterations": 10, "similarity_share": 0.5},
}


def reference_params(method: str, written: dict) -> dict:
    """A stage's parameters for a reference: the documented defaults, the tests' choices, then what
    the spec wrote (fusion terms likewise)."""
    params = {**OFFICIAL_DEFAULTS.get(method, {}), **TEST_CHOICES.get(method, {}), **written}
    if "terms" in params:
        params["terms"] = [{**term, "params": reference_params(term["method"], term.get("params", {}))}
                           for term in params["terms"]]
    return params
