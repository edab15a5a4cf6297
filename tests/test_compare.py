from __future__ import annotations

from typing import Any

import jmespath
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowproxy.config.ignore_paths import parse_path
from shadowproxy.config.settings import CompareSettings
from shadowproxy.pairs.compare import (
    ABSENT,
    MAX_DIFF,
    _search,
    compare_responses,
    compile_expression,
    similar,
)
from shadowproxy.pairs.observation import Observation
from shadowproxy.storage.record import (
    AGREE,
    DISAGREE,
    OUTCOMES,
    PRIMARY_ERROR,
    SHADOW_ERROR,
    Comparison,
)

FAST = settings(max_examples=100, deadline=None)


def obs(
    body: Any = b"{}",
    status: int | None = 200,
    *,
    error: str | None = None,
    truncated: bool = False,
) -> Observation:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Observation("up", status, (), raw, truncated, 1.0, error)


def cmp(rule: CompareSettings, primary: Observation, shadow: Observation) -> Comparison:
    return compare_responses(rule, primary, shadow)


LABEL = CompareSettings(label="label")
WHOLE = CompareSettings()

# --- outcome rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "primary",
    [obs(error="timeout"), obs(status=None), obs(status=500), obs(status=503, error="reset")],
)
@pytest.mark.parametrize("rule", [LABEL, WHOLE])
def test_failed_primary_wins_over_any_shadow(primary: Observation, rule: CompareSettings) -> None:
    for shadow in (obs({"label": 1}), obs(error="connect"), obs(status=502)):
        c = cmp(rule, primary, shadow)
        assert (c.outcome, c.agreement, c.shadow_error) == (PRIMARY_ERROR, None, None)


@pytest.mark.parametrize(
    ("shadow", "kind"),
    [
        (obs(error="timeout"), "timeout"),
        (obs(status=200, error="reset"), "reset"),
        (obs(status=None), "no_response"),
        (obs(status=500), "status_5xx"),
        (obs({"label": 1}, status=599), "status_5xx"),
    ],
)
@pytest.mark.parametrize("rule", [LABEL, WHOLE])
def test_failed_shadow_is_not_comparable(
    shadow: Observation, kind: str, rule: CompareSettings
) -> None:
    c = cmp(rule, obs({"label": 1}), shadow)
    assert (c.outcome, c.agreement, c.shadow_error) == (SHADOW_ERROR, None, kind)
    assert c.primary_label == ("1" if rule.label else None)


@pytest.mark.parametrize(("p", "s"), [(400, 400), (200, 404), (404, 200), (301, 200)])
def test_label_needs_both_2xx(p: int, s: int) -> None:
    c = cmp(LABEL, obs({"label": 1}, p), obs({"label": 1}, s))
    assert (c.outcome, c.agreement) == (DISAGREE, False)
    assert [(d.path, d.primary, d.shadow) for d in c.diff] == [("$status", p, s)]


def test_whole_body_needs_equal_status_only() -> None:
    assert cmp(WHOLE, obs({"e": "x"}, 404), obs({"e": "x"}, 404)).outcome == AGREE
    c = cmp(WHOLE, obs({}, 200), obs({}, 201))
    assert (c.outcome, c.diff[0].path) == (DISAGREE, "$status")


@pytest.mark.parametrize("rule", [LABEL, WHOLE])
def test_shadow_body_the_rule_cannot_use_counts_against_it(rule: CompareSettings) -> None:
    primary = obs({"label": "cat"})
    for shadow, kind in [
        (obs(b"<html>"), "not_json"),
        (obs(b'{"lab', truncated=True), "truncated"),
    ]:
        c = cmp(rule, primary, shadow)
        assert (c.outcome, c.agreement, c.shadow_error) == (SHADOW_ERROR, False, kind)
        assert c.diff[0].path == "$body"


def test_shadow_label_missing() -> None:
    c = cmp(LABEL, obs({"label": [1]}), obs({"other": 1}))
    assert (c.outcome, c.agreement, c.shadow_error) == (SHADOW_ERROR, False, "label_missing")
    assert (c.diff[0].path, c.diff[0].primary, c.diff[0].shadow) == ("$label", [1], ABSENT)


@pytest.mark.parametrize(
    "primary",
    [obs(b"not json"), obs({"other": 1}), obs({"label": None}), obs(b'{"label":', truncated=True)],
)
def test_primary_body_the_rule_cannot_use_is_primary_error(primary: Observation) -> None:
    c = cmp(LABEL, primary, obs({"label": 1}))
    assert (c.outcome, c.agreement, c.shadow_error) == (PRIMARY_ERROR, None, None)


def test_whole_body_non_json_compares_bytes() -> None:
    assert cmp(WHOLE, obs(b"ok\n"), obs(b"ok\n")).agreement is True
    c = cmp(WHOLE, obs(b"ok\n"), obs(b"ok"))
    assert (c.outcome, c.diff[0].path, c.shadow_error) == (DISAGREE, "$body", None)
    # Equal non-2xx statuses: a non-JSON shadow body is a plain difference, not an error.
    assert cmp(WHOLE, obs({}, 404), obs(b"nope", 404)).outcome == DISAGREE
    assert cmp(WHOLE, obs(b"", 204), obs(b"", 204)).outcome == AGREE


def test_whole_body_json_compares_as_data() -> None:
    assert cmp(WHOLE, obs(b'{"a": 1, "b": [1.0]}'), obs(b'{"b":[1],"a":1}')).outcome == AGREE


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "tolerance", "agree"),
    [
        (1, 1.0, 0.0, True),
        (0.5, 0.51, 0.01, True),
        (0.5, 0.52, 0.01, False),
        (1.0, 1.0000000000001, 0.0, False),
        ([0.1, {"p": 0.2}], [0.1005, {"p": 0.1995}], 0.001, True),
        ([0.1, {"p": 0.2}], [0.1005, {"p": 0.21}], 0.001, False),
        (True, 1, 1.0, False),
        (False, 0, 1.0, False),
        (True, True, 0.0, True),
        ("1", 1, 1.0, False),
        ([1, 2], [1, 2, 3], 0.0, False),
        ({"a": 1}, {"a": 1, "b": None}, 0.0, False),
        (18446744073709551615, 1.0, 0.5, False),
    ],
)
def test_label_equality(a: Any, b: Any, tolerance: float, agree: bool) -> None:
    rule = CompareSettings(label="label", tolerance=tolerance)
    c = cmp(rule, obs({"label": a}), obs({"label": b}))
    assert c.agreement is agree
    assert c.outcome == (AGREE if agree else DISAGREE)
    assert bool(c.diff) is not agree


def test_labels_and_scores_recorded() -> None:
    rule = CompareSettings(label="label", score="score")
    c = cmp(rule, obs({"label": "cat", "score": 0.75}), obs({"label": {"b": 1, "a": [2]}}))
    assert (c.primary_label, c.shadow_label) == ("cat", '{"a":[2],"b":1}')
    assert (c.primary_score, c.shadow_score) == (0.75, None)
    long = cmp(rule, obs({"label": "x" * 1000, "score": 3}), obs({"label": list(range(500))}))
    assert long.primary_label is not None and len(long.primary_label) == 256
    assert long.shadow_label is not None and len(long.shadow_label) == 256
    assert long.primary_score == 3.0


@pytest.mark.parametrize("score", [True, "0.9", [0.9], None, {"v": 1}])
def test_non_numeric_score_is_none(score: Any) -> None:
    c = cmp(CompareSettings(score="s"), obs({"s": score}), obs({"s": score}))
    assert (c.primary_score, c.shadow_score, c.outcome) == (None, None, AGREE)


def test_labels_recorded_whatever_the_outcome() -> None:
    c = cmp(LABEL, obs({"label": 1}, 400), obs({"label": 2}, 200))
    assert (c.primary_label, c.shadow_label) == ("1", "2")


def test_diff_paths_and_bounds() -> None:
    c = cmp(WHOLE, obs({"outputs": [{"data": [1, 2]}]}), obs({"outputs": [{"data": [1, 3]}]}))
    assert [(d.path, d.primary, d.shadow) for d in c.diff] == [("outputs[0].data[1]", 2, 3)]
    c = cmp(WHOLE, obs({"a b": 1}), obs({"a b": 2}))
    assert c.diff[0].path == '"a b"'
    c = cmp(WHOLE, obs(1), obs(2))
    assert c.diff[0].path == "$"
    c = cmp(WHOLE, obs(list(range(100))), obs([-1] * 100))
    assert len(c.diff) == MAX_DIFF
    big = {"k": "x" * 500, "l": list(range(200))}
    c = cmp(WHOLE, obs({"v": big}), obs({"v": 1}))
    assert c.diff[0].primary == "<object of 2>"
    c = cmp(WHOLE, obs({"s": "y" * 500}), obs({"s": "z" * 500}))
    assert len(c.diff[0].primary) == 201


# --- ignore paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "a", "b"),
    [
        ("request_id", {"v": 1, "request_id": "a"}, {"v": 1, "request_id": "b"}),
        ("input.ssn", {"input": {"ssn": 1, "x": 2}}, {"input": {"ssn": 3, "x": 2}}),
        ("outputs[*].id", {"outputs": [{"id": 1}, {"id": 2}]}, {"outputs": [{"id": 3}, {"id": 4}]}),
        ("outputs[1].id", {"outputs": [{"id": 1}, {"id": 2}]}, {"outputs": [{"id": 1}, {"id": 5}]}),
        ("outputs[-1]", {"outputs": [1, 2]}, {"outputs": [1, 9]}),
        ("*.ts", {"a": {"ts": 1}, "b": {"ts": 2}}, {"a": {"ts": 3}, "b": {"ts": 4}}),
        ("[0]", [1, 2], [7, 2]),
        ('"a.b".c', {"a.b": {"c": 1}}, {"a.b": {"c": 2}}),
        ("only_here", {"only_here": 1, "v": 1}, {"v": 1}),
    ],
)
def test_ignore_drops_paths(path: str, a: Any, b: Any) -> None:
    assert cmp(WHOLE, obs(a), obs(b)).outcome == DISAGREE
    assert cmp(CompareSettings(ignore=(path,)), obs(a), obs(b)).outcome == AGREE


def test_ignore_leaves_other_fields_and_bad_paths_alone() -> None:
    rule = CompareSettings(ignore=("a[", "x.y", "v[0]", "v.w"))
    assert cmp(rule, obs({"v": 1, "x": 1}), obs({"v": 2, "x": 1})).outcome == DISAGREE


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.[0]", "a[x]", "a]", '"\\q"'])
def test_parse_path_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_path(bad)


# --- robustness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        CompareSettings(label="a["),  # invalid: config validation should have caught it
        CompareSettings(label="abs(label)", score="sum(score)"),
        CompareSettings(label="nosuchfn(label)"),
    ],
)
def test_bad_expressions_never_raise(rule: CompareSettings) -> None:
    c = cmp(rule, obs({"label": "x", "score": ["y"]}), obs({"label": "x"}))
    assert (c.outcome, c.primary_score) == (PRIMARY_ERROR, None)


def test_deep_json_is_opaque_bytes() -> None:
    deep = b"[" * 1000 + b"]" * 1000
    assert cmp(WHOLE, obs(deep), obs(deep)).outcome == AGREE
    c = cmp(LABEL, obs({"label": 1}), obs(deep))
    assert c.shadow_error == "not_json"


def test_compile_expression_is_cached() -> None:
    assert compile_expression("a.b") is compile_expression("a.b")


def test_similarity() -> None:
    base = "The model predicts a positive sentiment for this review."
    assert similar(base, base.replace(".", "!"), 0.9)
    assert not similar(base, "Negative.", 0.9)
    assert similar("", "", 0.9)
    assert not similar("", "x", 0.5)
    # Beyond the token cap the lengths still count: a long tail is a difference.
    assert not similar("a " * 600, "a " * 2000, 0.9)
    rule = CompareSettings(label="choices[*].message.content", similarity=0.9)
    reply = {"choices": [{"message": {"content": base}}]}
    other = {
        "choices": [
            {"message": {"content": base.replace("this", "the").replace("positive", "negative")}}
        ]
    }
    c = cmp(rule, obs(reply), obs(other))
    assert (c.outcome, c.diff[0].path) == (DISAGREE, "$label[0]")


# --- properties -----------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
bodies = json_values.map(orjson.dumps) | st.binary(max_size=40)
statuses = st.none() | st.integers(0, 999)
errors = st.none() | st.sampled_from(["timeout", "connect", "protocol", "reset"]) | text
expressions = st.none() | st.sampled_from(["label", "a.b", "[0]", "a[", "abs(@)", "length(@)"])
rules = st.builds(
    CompareSettings,
    label=expressions,
    score=expressions,
    tolerance=st.floats(),
    ignore=st.lists(text | st.sampled_from(["a", "[*]", "*", "a[0].b"]), max_size=3).map(tuple),
    similarity=st.none() | st.floats(),
)
observations = st.builds(
    Observation,
    upstream=st.just("u"),
    status=statuses,
    headers=st.lists(st.tuples(text, text), max_size=2).map(tuple),
    body=bodies,
    body_truncated=st.booleans(),
    latency_ms=st.floats(),
    error=errors,
)


@FAST
@given(rules, observations, observations)
def test_never_raises_and_invariants_hold(
    rule: CompareSettings, primary: Observation, shadow: Observation
) -> None:
    c = compare_responses(rule, primary, shadow)
    assert c.outcome in OUTCOMES
    assert (c.agreement is True) == (c.outcome == AGREE)
    assert (c.shadow_error is not None) == (c.outcome == SHADOW_ERROR)
    if c.outcome == PRIMARY_ERROR:
        assert c.agreement is None
    if c.outcome == DISAGREE:
        assert c.agreement is False and c.diff
    assert len(c.diff) <= MAX_DIFF
    for label in (c.primary_label, c.shadow_label):
        assert label is None or len(label) <= 256
    orjson.dumps([(d.path, d.primary, d.shadow) for d in c.diff])  # storable as JSON


ok_statuses = st.integers(200, 299)


@FAST
@given(bodies, bodies, ok_statuses, st.sampled_from([(), ("a",), ("[*]",)]))
def test_whole_body_agreement_is_symmetric(
    a: bytes, b: bytes, status: int, ignore: tuple[str, ...]
) -> None:
    rule = CompareSettings(tolerance=0.5, ignore=ignore)
    forward = cmp(rule, obs(a, status), obs(b, status)).agreement
    assert forward is cmp(rule, obs(b, status), obs(a, status)).agreement


@FAST
@given(
    json_values.filter(lambda v: v is not None),
    json_values.filter(lambda v: v is not None),
    st.none() | st.sampled_from([0.0, 0.5, 0.9, 1.0]),
)
def test_label_agreement_is_symmetric(a: Any, b: Any, similarity: float | None) -> None:
    rule = CompareSettings(label="label", tolerance=0.5, similarity=similarity)
    forward = cmp(rule, obs({"label": a}), obs({"label": b})).agreement
    assert forward is cmp(rule, obs({"label": b}), obs({"label": a})).agreement


@FAST
@given(bodies, json_values.filter(lambda v: v is not None), ok_statuses, rules)
def test_reflexive(body: bytes, label: Any, status: int, rule: CompareSettings) -> None:
    whole = CompareSettings(tolerance=rule.tolerance, ignore=rule.ignore)
    assert cmp(whole, obs(body, status), obs(body, status)).outcome == AGREE
    labelled = CompareSettings(label="label", similarity=rule.similarity)
    assert cmp(labelled, obs({"label": label}), obs({"label": label})).outcome == AGREE


@FAST
@given(
    st.integers(-(10**6), 10**6),
    st.integers(0, 1000),
    st.integers(-2000, 2000),
    st.booleans(),
)
def test_tolerance_edges(base: int, tol: int, delta: int, nested: bool) -> None:
    # Eighths are exact in binary floating point, so |a - b| <= tolerance has no rounding.
    a, b, tolerance = base / 8, (base + delta) / 8, tol / 8
    rule = CompareSettings(label="label", tolerance=tolerance)
    wrap = (lambda v: [{"x": [v]}]) if nested else (lambda v: v)
    c = cmp(rule, obs({"label": wrap(a)}), obs({"label": wrap(b)}))
    assert c.agreement is (abs(delta) <= tol)
    whole = cmp(CompareSettings(tolerance=tolerance), obs(wrap(a)), obs(wrap(b)))
    assert whole.agreement is (abs(delta) <= tol)


@FAST
@given(
    st.dictionaries(text.filter(lambda k: k not in {"meta", "items"}), json_values, max_size=4),
    json_values,
    json_values,
    st.lists(st.tuples(json_values, json_values), max_size=4),
)
def test_ignore_removes_differences(
    common: dict[str, Any], meta_a: Any, meta_b: Any, ids: list[tuple[Any, Any]]
) -> None:
    a = {**common, "meta": {"request_id": meta_a}, "items": [{"id": x, "v": 1} for x, _ in ids]}
    b = {**common, "meta": {"request_id": meta_b}, "items": [{"id": y, "v": 1} for _, y in ids]}
    rule = CompareSettings(ignore=("meta.request_id", "items[*].id"))
    assert cmp(rule, obs(a), obs(b)).outcome == AGREE


words = st.lists(st.sampled_from(["the", "cat", "sat", "on", "a", "mat", ".", "!"]), max_size=700)


@FAST
@given(words, words, st.floats(0, 1))
def test_similarity_is_symmetric(a: list[str], b: list[str], threshold: float) -> None:
    x, y = " ".join(a), " ".join(b)
    assert similar(x, y, threshold) is similar(y, x, threshold)
    assert similar(x, x, threshold)


_KEYS = st.sampled_from(["a", "b", "prediction", "_x", "null"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=12,
)


@given(st.lists(_KEYS, min_size=1, max_size=4).map(".".join), _JSON)
def test_plain_key_paths_read_what_jmespath_reads(expression: str, data: Any) -> None:
    # Plain dotted keys skip the JMESPath interpreter; the answer must not change.
    assert _search(expression, data) == jmespath.search(expression, data)


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)  # what JSON encoders take
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    body=_JSONISH.map(orjson.dumps) | st.binary(max_size=40) | st.just(b"[" * 70 + b"]" * 70),
    status=st.sampled_from([200, 204, 404, 500, 503]),
    ignore=st.sampled_from([(), ("a",), ("a.b",)]),
    tolerance=st.sampled_from([0.0, 0.5]),
)
def test_identical_answers_are_judged_as_the_full_rule_judges_them(
    body: bytes,
    status: int,
    ignore: tuple[str, ...],
    tolerance: float,
) -> None:
    """The byte-equality shortcut gives exactly what parsing both sides would give."""
    from unittest import mock

    import shadowproxy.pairs.compare as compare

    rule = CompareSettings(ignore=ignore, tolerance=tolerance)
    fast = compare_responses(rule, obs(body, status), obs(body, status))
    with mock.patch.object(compare, "_same_bytes", lambda *_: False):
        slow = compare_responses(rule, obs(body, status), obs(body, status))
    assert fast == slow
