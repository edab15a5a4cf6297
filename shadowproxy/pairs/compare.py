"""Compare one shadow response with the primary's: a pure function that never raises.

Outcome rules, checked in this order (first match decides):

1. The primary failed (transport error, no status, status >= 500) → ``primary_error``,
   agreement None. This wins over any shadow failure: a pair whose primary failed says
   nothing about the shadow, and ``shadow_error`` is set only when the outcome is
   ``shadow_error``.
2. The shadow failed in transport → ``shadow_error`` with the error kind (``no_response``
   when no status arrived without a named error); status >= 500 → ``status_5xx``.
   Agreement None: not comparable.
3. Statuses: with ``label`` both must be 2xx, without it they must be equal; otherwise
   ``disagree`` (agreement False, diff ``$status``).
4. The primary's body cannot be read as the rule needs (truncated; with ``label``: not
   JSON, or the label is missing) → ``primary_error``, agreement None. Blaming the shadow
   would be unfair, and counting the pair as agreement would let a mistyped label
   expression pass every gate.
5. The shadow's body is not what the rule needs → ``shadow_error`` with ``truncated``,
   ``not_json`` (a 2xx that is not JSON where the primary's is) or ``label_missing``, and
   agreement **False**: PRODUCT says such a body "is not an agreement", so it counts
   against the shadow in the agreement ratio and in the error rate alike.
6. Otherwise the labels (or the bodies minus ``ignore`` paths) decide ``agree``/``disagree``.
   Numbers match within the absolute ``tolerance`` (plus 1e-12 relative for binary
   rounding when it is positive; exact when it is 0); bools are not numbers (``true != 1``);
   with ``similarity`` set, label strings match when their token similarity reaches it.
   Without ``label``, bodies that are not both JSON compare byte for byte.

Labels and scores are extracted whenever a side's complete body is JSON, whatever the
outcome. JSON nested deeper than ``MAX_DEPTH`` is treated as opaque bytes so every walk
stays far from the recursion limit.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jmespath
import orjson
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from shadowproxy.base.error_kinds import ErrorKind
from shadowproxy.config.ignore_paths import drop_all
from shadowproxy.config.settings import CompareSettings
from shadowproxy.pairs.observation import Observation
from shadowproxy.storage.record import (
    AGREE,
    DISAGREE,
    PRIMARY_ERROR,
    SHADOW_ERROR,
    Comparison,
    DiffEntry,
)

MAX_DIFF = 20
MAX_DEPTH = 64
MAX_LABEL_CHARS = 256
MAX_VALUE_CHARS = 200
MAX_SIMILARITY_TOKENS = 512
ABSENT = "<absent>"  # diff value of a key or index one side lacks

_NOT_JSON = object()


def compare_responses(
    rule: CompareSettings, primary: Observation, shadow: Observation
) -> Comparison:
    if _same_bytes(rule, primary, shadow):
        # What the whole-body rule concludes for identical answers (equal data, or equal
        # bytes), without parsing them: agreeing models often answer byte for byte alike.
        return Comparison(AGREE, True, None, None, None, None, None, ())
    p, s = _read(rule, primary), _read(rule, shadow)

    def done(
        outcome: str,
        agreement: bool | None,
        error: ErrorKind | None = None,
        diff: Iterable[DiffEntry] = (),
    ) -> Comparison:
        return Comparison(
            outcome=outcome,
            agreement=agreement,
            primary_label=_label_text(p.label),
            shadow_label=_label_text(s.label),
            primary_score=p.score,
            shadow_score=s.score,
            shadow_error=error,
            diff=tuple(diff),
        )

    if primary.error is not None or primary.status is None or primary.status >= 500:
        return done(PRIMARY_ERROR, None)
    if shadow.error is not None or shadow.status is None:
        return done(SHADOW_ERROR, None, shadow.error or "no_response")
    if shadow.status >= 500:
        return done(SHADOW_ERROR, None, "status_5xx")
    status = DiffEntry("$status", primary.status, shadow.status)
    labelled = rule.label is not None
    if labelled and not (_is_2xx(primary.status) and _is_2xx(shadow.status)):
        return done(DISAGREE, False, diff=[status])
    if not labelled and primary.status != shadow.status:
        return done(DISAGREE, False, diff=[status])
    if primary.body_truncated or (labelled and (p.data is _NOT_JSON or p.label is None)):
        return done(PRIMARY_ERROR, None)
    if shadow.body_truncated:
        return done(SHADOW_ERROR, False, "truncated", [DiffEntry("$body", "<complete>", "<cut>")])
    if p.data is not _NOT_JSON and s.data is _NOT_JSON and (labelled or _is_2xx(shadow.status)):
        return done(SHADOW_ERROR, False, "not_json", [_body_diff(primary, shadow)])
    if labelled and s.label is None:
        entry = DiffEntry("$label", _summary(p.label), ABSENT)
        return done(SHADOW_ERROR, False, "label_missing", [entry])

    if labelled:
        walk = _Walk(rule.tolerance, rule.similarity)
        same = walk.same(p.label, s.label, "$label")
        diff = walk.diff
    elif p.data is not _NOT_JSON and s.data is not _NOT_JSON:
        walk = _Walk(rule.tolerance, None)
        same = walk.same(drop_all(p.data, rule.ignore), drop_all(s.data, rule.ignore), "")
        diff = walk.diff
    else:
        same = primary.body == shadow.body
        diff = [] if same else [_body_diff(primary, shadow)]
    return done(AGREE if same else DISAGREE, same, diff=diff)


def _same_bytes(rule: CompareSettings, primary: Observation, shadow: Observation) -> bool:
    return (
        rule.label is None
        and rule.score is None
        and primary.error is None
        and shadow.error is None
        and primary.status is not None
        and primary.status < 500
        and primary.status == shadow.status
        and not primary.body_truncated
        and not shadow.body_truncated
        and primary.body == shadow.body
    )


@functools.lru_cache(maxsize=256)
def compile_expression(expression: str) -> ParsedResult:
    """Compiled JMESPath, cached; raises ``jmespath.exceptions.ParseError`` (a ValueError)."""
    return jmespath.compile(expression)


# --- reading one side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Side:
    data: Any  # parsed body, or _NOT_JSON
    label: Any
    score: float | None


def _read(rule: CompareSettings, obs: Observation) -> _Side:
    if obs.error is not None or obs.status is None or obs.body_truncated:
        return _Side(_NOT_JSON, None, None)
    data = _parse(obs.body)
    if data is _NOT_JSON:
        return _Side(data, None, None)
    label = _search(rule.label, data)
    return _Side(data, label, _number(_search(rule.score, data)))


def _parse(body: bytes) -> Any:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return data  # too few brackets to nest deeper than the limit: no walk needed
    return _NOT_JSON if _deeper_than(data, MAX_DEPTH) else data


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item)
    return False


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@functools.lru_cache(maxsize=256)
def _dotted_keys(expression: str) -> tuple[str, ...] | None:
    """``a.b.c`` as its keys when the expression is nothing more than that, else None."""
    return tuple(expression.split(".")) if _DOTTED.fullmatch(expression) else None


def _search(expression: str | None, data: Any) -> Any:
    if expression is None:
        return None
    keys = _dotted_keys(expression)
    if keys is not None:
        # What JMESPath gives for plain field access, without its interpreter: a missing key
        # or a non-object on the way is null.
        for key in keys:
            if not isinstance(data, dict):
                return None
            data = data.get(key)
        return data
    try:
        return compile_expression(expression).search(data)
    except (JMESPathError, ArithmeticError, TypeError, RecursionError):
        return None  # an unusable expression or a value its functions reject: no value


def _number(value: Any) -> float | None:
    if not _is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_2xx(status: int) -> bool:
    return 200 <= status < 300


def _label_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else _compact(value)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def _compact(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits from a JMESPath sum()
        return str(value)


def _summary(value: Any) -> Any:
    """A diff value small enough for one row: long strings cut, big containers described."""
    if isinstance(value, str):
        return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "…"
    if isinstance(value, dict | list):
        if len(_compact(value)) <= MAX_VALUE_CHARS:
            return value
        kind = "object" if isinstance(value, dict) else "array"
        return f"<{kind} of {len(value)}>"
    return value


def _body_diff(primary: Observation, shadow: Observation) -> DiffEntry:
    def text(body: bytes) -> Any:
        return _summary(body[: MAX_VALUE_CHARS + 1].decode("utf-8", "backslashreplace"))

    return DiffEntry("$body", text(primary.body), text(shadow.body))


# --- comparing values -----------------------------------------------------------------------


class _Walk:
    """Structural equality that records up to MAX_DIFF differing paths on the way."""

    def __init__(self, tolerance: float, similarity: float | None) -> None:
        self.tolerance = tolerance
        self.similarity = similarity
        self.diff: list[DiffEntry] = []

    def same(self, a: Any, b: Any, path: str) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return self._same_dicts(a, b, path)
        if isinstance(a, list) and isinstance(b, list):
            return self._same_lists(a, b, path)
        if _is_number(a) and _is_number(b):
            equal = _close(a, b, self.tolerance)
        elif isinstance(a, str) and isinstance(b, str) and self.similarity is not None:
            equal = similar(a, b, self.similarity)
        else:
            equal = type(a) is type(b) and a == b
        if not equal:
            self._add(path or "$", a, b)
        return equal

    def _same_dicts(self, a: dict[str, Any], b: dict[str, Any], path: str) -> bool:
        equal = True
        for key in [*a, *(k for k in b if k not in a)]:
            if len(self.diff) >= MAX_DIFF:
                return False
            sub = _key_path(path, key)
            if key not in a or key not in b:
                self._add(sub, a.get(key, ABSENT), b.get(key, ABSENT))
                equal = False
            elif not self.same(a[key], b[key], sub):
                equal = False
        return equal

    def _same_lists(self, a: list[Any], b: list[Any], path: str) -> bool:
        equal = len(a) == len(b)
        for i in range(max(len(a), len(b))):
            if len(self.diff) >= MAX_DIFF:
                return False
            sub = f"{path}[{i}]"
            if i >= len(a) or i >= len(b):
                self._add(sub, a[i] if i < len(a) else ABSENT, b[i] if i < len(b) else ABSENT)
            elif not self.same(a[i], b[i], sub):
                equal = False
        return equal

    def _add(self, path: str, a: Any, b: Any) -> None:
        if len(self.diff) < MAX_DIFF:
            self.diff.append(DiffEntry(path, _summary(a), _summary(b)))


def _close(a: float, b: float, tolerance: float) -> bool:
    """``|a - b| <= tolerance``, forgiving the subtraction's binary rounding (0.51 - 0.5 > 0.01)."""
    if a == b:
        return True
    try:
        slack = 1e-12 * max(abs(a), abs(b)) if tolerance > 0 else 0.0
        return abs(a - b) <= tolerance + slack
    except OverflowError:  # an int beyond float range against a float
        return False


def _key_path(path: str, key: str) -> str:
    name = key if _IDENTIFIER.fullmatch(key) else orjson.dumps(key).decode()
    return f"{path}.{name}" if path else name


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def similar(a: str, b: str, threshold: float) -> bool:
    """Token-level difflib ratio >= threshold; symmetric and bounded in cost.

    Words and punctuation are the units (character ratios reward shared letters between
    different words and cost quadratic time in text length). Only the first
    MAX_SIMILARITY_TOKENS tokens are matched; the token counts still bound the ratio from
    above, so a long tail on one side is not ignored.
    """
    if a == b:
        return True
    ta, tb = _TOKEN.findall(a), _TOKEN.findall(b)
    if ta == tb:
        return True
    bound = 2 * min(len(ta), len(tb)) / (len(ta) + len(tb)) if ta or tb else 1.0
    if bound < threshold:
        return False
    ta, tb = sorted((ta[:MAX_SIMILARITY_TOKENS], tb[:MAX_SIMILARITY_TOKENS]))  # symmetry
    matcher = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    return matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold
