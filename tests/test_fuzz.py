"""Property-based fuzzing of the spec loader and validator.

Random YAML documents (spec-shaped and not), mutated shipped specs and alias-heavy documents must
give exit 0 or a clean exit 2 with file:line:col, never a traceback, and finish within a bound.
CI runs a small deterministic campaign; the large one is the same test with more examples:

    PRUNEC_FUZZ_EXAMPLES=10000 OMP_NUM_THREADS=1 python -m pytest tests/test_fuzz.py -s
"""
from __future__ import annotations

import os
import re
import signal
import tempfile
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import REPO
from prunec.cli import app

EXAMPLES = int(os.environ.get("PRUNEC_FUZZ_EXAMPLES", "150"))
SECONDS_PER_EXAMPLE = 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000, database=None,
                suppress_health_check=list(HealthCheck))
OUTCOMES: Counter = Counter()
_LOCATED = re.compile(r"^\S+:\d+:\d+: error at /[^\n]*?: .+", re.M)

KEYS = ["prunec", "name", "description", "model", "inputs", "pipeline", "extends", "output", "backend",
        "builtin", "path", "config", "seed", "dtype", "attn_implementation", "batch", "seq_len", "image_size",
        "site", "method", "params", "keep", "count", "ratio", "positions", "protect", "id", "action", "query"]
WORDS = ["tiny-llava", "tiny-vit", "llm.layers[1]", "projector.output", "vision.layers[0, 1]", "fastv",
         "divprune", "renumber", "keep_original", "cls", "text", "sdpa", "last", "all", "float32"]
SHIPPED = [p.read_text() for p in sorted((REPO / "specs").glob("*.yaml")) + sorted((REPO / "examples").glob("*.yaml"))
           if "extends" not in p.read_text()]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS), st.text(max_size=40),
    st.text(min_size=2000, max_size=5000, alphabet="ab\u00e9\u4e2d"),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), inner, max_size=6)), max_leaves=40)
spec_like = st.fixed_dictionaries({"prunec": st.sampled_from([1, 1, 2, "1"]), "name": st.sampled_from(["f", "a b"])},
                                  optional={k: values for k in ["model", "inputs", "pipeline", "backend", "output"]})


def _mutate(text: str, edits) -> str:
    chars = list(text)
    for position, kind, char in edits:
        if not chars:
            break
        i = position % len(chars)
        if kind == 0:
            del chars[i]
        elif kind == 1:
            chars.insert(i, char)
        else:
            chars[i] = char
    return "".join(chars)


mutations = st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 2),
                               st.sampled_from(list(":-[]{}&*!#|>'\"\n\t ,01.x\u00e9"))), min_size=1, max_size=8)
anchors = st.builds(lambda n, width: "a: &a [" + ", ".join(["1"] * width) + "]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * width) + "]\n" for i in range(n)),
    st.integers(0, 8), st.integers(1, 12))


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def check(text: str) -> None:
    """Validate `text` as a spec file: exit 0, or exit 2 with a located message; bounded in time."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(SECONDS_PER_EXAMPLE)
        try:
            result = CliRunner().invoke(app, ["validate", str(path)])
        except _Timeout:
            OUTCOMES["hang"] += 1
            raise AssertionError(f"validation took over {SECONDS_PER_EXAMPLE}s:\n{text[:500]}") from None
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    if result.exit_code not in (0, 2) or (result.exception and not isinstance(result.exception, SystemExit)):
        OUTCOMES["crash"] += 1
        raise AssertionError(f"crash ({result.exception!r}):\n{text[:500]}")
    if result.exit_code == 2 and not _LOCATED.search(result.output):
        OUTCOMES["unlocated"] += 1
        raise AssertionError(f"error without file:line:col:\n{result.output}\n---\n{text[:500]}")
    assert "Traceback" not in result.output
    OUTCOMES["valid" if result.exit_code == 0 else "rejected"] += 1


@FUZZ
@given(spec_like)
def test_fuzz_spec_shaped_documents(doc):
    check(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))


@FUZZ
@given(values)
def test_fuzz_arbitrary_yaml_values(doc):
    check(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(st.sampled_from(SHIPPED), mutations)
def test_fuzz_mutated_shipped_specs(text, edits):
    check(_mutate(text, edits))


@FUZZ
@given(anchors)
def test_fuzz_alias_expansion(text):
    check(text)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_raw_text(text):
    check(text)


def test_zz_report():
    """Prints the campaign's totals (run with -s); fails if anything crashed or hung."""
    print(f"\nfuzz outcomes ({EXAMPLES} examples per strategy): {dict(sorted(OUTCOMES.items()))}")
    assert OUTCOMES["crash"] == 0 and OUTCOMES["hang"] == 0 and OUTCOMES["unlocated"] == 0
