"""Turn one compared exchange into a storable ``Record``: redacted, truncated, text-safe.

Order matters: JSON redaction runs on the whole captured body before truncation
(a cut body cannot be parsed), then the body is cut to ``max_stored_body_bytes``
and decoded. Every text that reaches a store goes through ``safe_text``:
PostgreSQL text and jsonb reject NUL, and lone surrogates cannot be encoded.
"""

from __future__ import annotations

import codecs
from itertools import chain
from typing import Any

from shadowproxy.config.settings import StorageSettings
from shadowproxy.pairs.observation import Exchange
from shadowproxy.pairs.redact import REDACTED, redact_headers, redact_json_body, redact_value_at
from shadowproxy.storage.record import Comparison, Record

TRUNCATION_MARKER = "…[truncated]"


def build_record(
    exchange: Exchange, comparison: Comparison, storage: StorageSettings, instance: str
) -> Record:
    request, primary, shadow = exchange.request, exchange.primary, exchange.shadow
    redact = storage.redact

    def body(raw: bytes, captured_truncated: bool) -> str | None:
        if not storage.store_bodies:
            return None
        return body_text(
            redact_json_body(raw, redact.json), storage.max_stored_body_bytes, captured_truncated
        )

    diff = [
        {
            "path": safe_text(entry.path),
            "primary": REDACTED if redact_value_at(entry.path, redact.json) else entry.primary,
            "shadow": REDACTED if redact_value_at(entry.path, redact.json) else entry.shadow,
        }
        for entry in comparison.diff
    ]
    return Record(
        request_id=safe_text(request.request_id),
        ts=request.ts,
        route=safe_text(request.route),
        method=safe_text(request.method),
        path=safe_text(request.path),
        query=safe_text(request.query),
        request_headers=_safe_headers(redact_headers(request.headers, redact.headers)),
        request_body=body(request.body, False),
        primary_upstream=safe_text(primary.upstream),
        primary_status=primary.status,
        primary_latency_ms=primary.latency_ms,
        primary_body=body(primary.body, primary.body_truncated),
        primary_label=_opt_text(comparison.primary_label),
        primary_score=comparison.primary_score,
        shadow_upstream=safe_text(shadow.upstream),
        shadow_status=shadow.status,
        shadow_latency_ms=shadow.latency_ms,
        shadow_body=body(shadow.body, shadow.body_truncated),
        shadow_label=_opt_text(comparison.shadow_label),
        shadow_score=comparison.shadow_score,
        shadow_error=_opt_text(comparison.shadow_error or shadow.error),
        agreement=comparison.agreement,
        diff=[safe_json(d) for d in diff],
        instance=safe_text(instance),
        config_sha=safe_text(exchange.config_sha),
    )


def body_text(raw: bytes, limit: int, already_truncated: bool = False) -> str:
    """UTF-8 text of at most ``limit`` bytes of ``raw``; invalid bytes backslash-escaped.

    A cut (here or at capture) ends with TRUNCATION_MARKER. The cut never splits
    a UTF-8 sequence: an incomplete trailing sequence is dropped, not escaped.
    """
    cut = len(raw) > limit
    if not cut and raw.isascii() and b"\x00" not in raw:  # the common case: nothing to do
        text = raw.decode("ascii")
        return text + TRUNCATION_MARKER if already_truncated else text
    if cut:
        decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        text = decoder.decode(raw[: max(limit, 0)], final=False)
    else:
        text = raw.decode("utf-8", "backslashreplace")
    text = safe_text(text)
    if len(encoded := text.encode("utf-8")) > limit:
        # Escaping binary bytes (\xNN) can quadruple them: the stored text obeys the limit too.
        text, cut = encoded[: max(limit, 0)].decode("utf-8", "ignore"), True
    return text + TRUNCATION_MARKER if cut or already_truncated else text


def safe_text(text: str) -> str:
    """Text every store accepts: NUL as the four characters ``\\x00``, lone surrogates escaped."""
    if text.isascii():  # the common case, checked in C: no surrogates possible
        return text.replace("\x00", "\\x00") if "\x00" in text else text
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_json(value: Any) -> Any:
    """A JSON value with every string (keys too) passed through ``safe_text``."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(str(k)): safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [safe_json(v) for v in value]
    return value


def _safe_headers(headers: dict[str, str]) -> dict[str, str]:
    text = "".join(chain.from_iterable(headers.items()))
    if text.isascii() and "\x00" not in text:  # what the proxy forwards: one check for all
        return headers
    return {safe_text(k): safe_text(v) for k, v in headers.items()}


def _opt_text(text: str | None) -> str | None:
    return None if text is None else safe_text(text)
