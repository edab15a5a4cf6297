"""Redaction of secrets and PII before a record is stored, spooled or logged.

Header names match case-insensitively. JSON paths are dotted (``input.ssn``);
a list on the way is searched element by element unless the segment is an index
(``instances.0.ssn``). A body that is not valid JSON (for example cut off by the
capture limit) cannot be walked, so every configured path's last key is redacted
wherever it appears as a key: over-redacting is safe, leaking is not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import orjson

REDACTED = "[REDACTED]"


def redact_headers(headers: Iterable[tuple[str, str]], names: Iterable[str]) -> dict[str, str]:
    """Headers as a dict (repeated names joined with ", "), redacted names' values replaced."""
    secret = _lowered(names if isinstance(names, tuple) else tuple(names))
    out: dict[str, str] = {}
    spelled: dict[str, str] = {}  # lower-case name -> spelling first seen
    for name, value in headers:
        lower = name.lower()
        key = spelled.setdefault(lower, name)
        if lower in secret:
            out[key] = REDACTED
        elif key in out:
            out[key] = f"{out[key]}, {value}"
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=64)
def _lowered(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


def redact_json_body(body: bytes, paths: Iterable[str]) -> bytes:
    """The body with every value at one of ``paths`` replaced by "[REDACTED]".

    Unchanged bytes when nothing matched, so bodies keep their exact form.
    """
    split = [p.split(".") for p in paths if p]
    if not split or not body:
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _redact_unparsable(body, [s[-1] for s in split])
    hits = sum(_redact_path(doc, segments) for segments in split)
    return orjson.dumps(doc) if hits else body


def redact_value_at(path: str, paths: Iterable[str]) -> bool:
    """Whether a diff path like ``input[0].ssn`` falls under a redacted JSON path."""
    plain = re.sub(r"\[(\d+|\*)\]", "", path).lstrip("$.")
    return any(plain == p or plain.startswith(p + ".") for p in paths if p)


def _redact_path(node: Any, segments: list[str]) -> int:
    if not segments:
        return 0
    head, rest = segments[0], segments[1:]
    if isinstance(node, list):
        if head.isdigit():
            index = int(head)
            if index >= len(node):
                return 0
            if not rest:
                node[index] = REDACTED
                return 1
            return _redact_path(node[index], rest)
        return sum(_redact_path(item, segments) for item in node)
    if isinstance(node, dict) and head in node:
        if not rest:
            node[head] = REDACTED
            return 1
        return _redact_path(node[head], rest)
    return 0


# A JSON value after `"key":` — a string, or anything up to the next delimiter.
_VALUE = r'(?:"(?:[^"\\]|\\.)*"?|[^,}\]\s]*)'


def _redact_unparsable(body: bytes, keys: list[str]) -> bytes:
    for key in set(keys):
        pattern = re.compile(rb'("' + re.escape(key.encode()) + rb'"\s*:\s*)' + _VALUE.encode())
        body = pattern.sub(b'\\1"' + REDACTED.encode() + b'"', body)
    return body
