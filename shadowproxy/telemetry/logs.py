"""structlog set-up: one JSON object per line on stderr, ISO UTC timestamps.

Two processors guard every line, whoever logs it (structlog or a stdlib logger such
as aiohttp's): ``scrub_secrets`` replaces the values of secret-looking keys (defence in
depth: redaction happens before anything is logged) and ``sanitize`` escapes CR, LF and
other control characters and truncates very long strings, so a client-supplied value
can never forge a log line or flood the log.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
MAX_VALUE_CHARS = 4096

# Matched against the end of the normalised key (lower case, "-" -> "_").
_SECRET_KEY = re.compile(
    r"(authorization|cookie|token|password|passwd|secret|(api|secret|access|private)_?key|credentials?)$"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HANDLER_NAME = "shadowproxy"
# Values other processors consume as objects (exception tuples, the stdlib record).
_PASS_THROUGH = frozenset({"exc_info", "stack_info", "_record", "_from_structlog"})


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.lower().replace("-", "_")))


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_key(k) else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        if len(value) == 2 and isinstance(value[0], str) and is_secret_key(value[0]):
            return (value[0], REDACTED)  # a (name, value) header pair
        return [_scrub(v) for v in value]
    return value


def scrub_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Replace the values of keys named like credentials, at any depth, and bearer tokens."""
    return {
        key: value if key in _PASS_THROUGH else REDACTED if is_secret_key(key) else _scrub(value)
        for key, value in event_dict.items()
    }


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str, max_chars: int = MAX_VALUE_CHARS) -> str:
    if _CONTROL.search(text):
        text = _CONTROL.sub(_escape, text)
    if len(text) > max_chars:
        text = f"{text[:max_chars]}...[{len(text) - max_chars} more chars]"
    return text


def _sanitize(value: Any) -> Any:
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, Mapping):
        return {_sanitize(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    return value


def sanitize(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Escape control characters (log injection) and truncate long strings, at any depth."""
    return {
        key: value if key in _PASS_THROUGH else _sanitize(value)
        for key, value in event_dict.items()
    }


def configure_logging(level: str = "info", json: bool = True, stream: TextIO | None = None) -> None:
    """Configure structlog and route stdlib logging (aiohttp, asyncio) through the same chain."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    out = stream if stream is not None else sys.stderr
    guards: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_secrets,
        sanitize,
    ]
    renderer: Processor
    if json:
        # Tracebacks are formatted after sanitize: JSON encoding keeps their newlines safe.
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        tail = [renderer]

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.StackInfoRenderer(),
            *guards,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *guards],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
