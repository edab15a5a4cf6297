"""Ignore paths (``compare.ignore``): their grammar, checked when routes.yaml loads, and what
they remove from a JSON body before two bodies are compared.
"""

from __future__ import annotations

import enum
import functools
import re
from typing import Any

import orjson


class _Any(enum.Enum):
    KEY = "*"
    INDEX = "[*]"


_Segment = str | int | _Any
_PATH_TOKEN = re.compile(
    r'(?P<dot>\.)?(?:(?P<key>[^.\[\]"]+)|"(?P<quoted>(?:[^"\\]|\\.)*)"|\[(?P<index>\*|-?\d+)\])'
)


@functools.lru_cache(maxsize=256)
def parse_path(path: str) -> tuple[_Segment, ...]:
    """Parse an ignore path: ``a.b``, ``outputs[*].id``, ``items[0]``, ``*.id``, ``"a.b".c``.

    Raises ValueError naming the position of the first invalid character.
    """
    segments: list[_Segment] = []
    pos = 0
    while pos < len(path):
        match = _PATH_TOKEN.match(path, pos)
        is_index = match is not None and match["index"] is not None
        if match is None or bool(match["dot"]) != (bool(segments) and not is_index):
            raise ValueError(f"invalid path {path!r} at character {pos + 1}")
        if is_index:
            segments.append(_Any.INDEX if match["index"] == "*" else int(match["index"]))
        elif match["key"] is not None:
            segments.append(_Any.KEY if match["key"] == "*" else match["key"])
        else:
            try:
                segments.append(orjson.loads(f'"{match["quoted"]}"'))
            except orjson.JSONDecodeError:
                raise ValueError(f"invalid quoted key in path {path!r}") from None
        pos = match.end()
    if not segments:
        raise ValueError("empty path")
    return tuple(segments)


def drop_all(data: Any, paths: tuple[str, ...]) -> Any:
    """``data`` without what any of ``paths`` selects; invalid paths are skipped."""
    for path in paths:
        try:
            segments = parse_path(path)
        except ValueError:
            continue  # config validation reports it; comparison must not fail
        data = _drop(data, segments)
    return data


def _drop(value: Any, segments: tuple[_Segment, ...]) -> Any:
    """``value`` without what ``segments`` selects; shares untouched parts, never mutates."""
    head, rest = segments[0], segments[1:]
    if isinstance(head, str) or head is _Any.KEY:
        if not isinstance(value, dict):
            return value
        keys: list[Any] = list(value) if head is _Any.KEY else [head] if head in value else []
    else:
        if not isinstance(value, list):
            return value
        if head is _Any.INDEX:
            keys = list(range(len(value)))
        else:
            keys = [head % len(value)] if -len(value) <= head < len(value) else []
    if not keys:
        return value
    if rest:
        copy = value.copy()
        for key in keys:
            copy[key] = _drop(value[key], rest)
        return copy
    dropped = set(keys)
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in dropped}
    return [v for i, v in enumerate(value) if i not in dropped]
