"""The comparison result and the stored row: the shared vocabulary of compare, record and report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shadowproxy.base.error_kinds import ErrorKind

# Outcomes of one (request, shadow) comparison; also the `outcome` label values.
AGREE = "agree"
DISAGREE = "disagree"
SHADOW_ERROR = "shadow_error"
PRIMARY_ERROR = "primary_error"
OUTCOMES = (AGREE, DISAGREE, SHADOW_ERROR, PRIMARY_ERROR)


@dataclass(frozen=True, slots=True)
class DiffEntry:
    path: str  # e.g. "outputs[0].data[1]" or "$status"
    primary: Any
    shadow: Any


@dataclass(frozen=True, slots=True)
class Comparison:
    outcome: str  # one of OUTCOMES
    agreement: bool | None  # None when not comparable (a side failed)
    primary_label: str | None  # strings as-is, anything else as compact JSON
    shadow_label: str | None
    primary_score: float | None
    shadow_score: float | None
    shadow_error: ErrorKind | None  # shadowproxy.base.error_kinds
    diff: tuple[DiffEntry, ...] = ()


# Column order of table shadow_log (and the keys of a JSON Lines record), minus `id`.
RECORD_COLUMNS: tuple[str, ...] = (
    "request_id",
    "ts",
    "route",
    "method",
    "path",
    "query",
    "request_headers",
    "request_body",
    "primary_upstream",
    "primary_status",
    "primary_latency_ms",
    "primary_body",
    "primary_label",
    "primary_score",
    "shadow_upstream",
    "shadow_status",
    "shadow_latency_ms",
    "shadow_body",
    "shadow_label",
    "shadow_score",
    "shadow_error",
    "agreement",
    "diff",
    "instance",
    "config_sha",
)


@dataclass(frozen=True, slots=True)
class Record:
    """One row of shadow_log: one (request, shadow) pair, redacted and truncated, ready to store.

    Bodies are text: UTF-8 decoded (invalid bytes backslash-escaped), truncation marked.
    ``ts`` is unix seconds (UTC). Labels: strings as-is, other JSON values compact-encoded.
    """

    request_id: str
    ts: float
    route: str
    method: str
    path: str
    query: str
    request_headers: dict[str, str]
    request_body: str | None
    primary_upstream: str
    primary_status: int | None
    primary_latency_ms: float | None
    primary_body: str | None
    primary_label: str | None
    primary_score: float | None
    shadow_upstream: str
    shadow_status: int | None
    shadow_latency_ms: float | None
    shadow_body: str | None
    shadow_label: str | None
    shadow_score: float | None
    shadow_error: str | None  # an ErrorKind (shadowproxy.base.error_kinds); any text read back
    agreement: bool | None
    diff: list[dict[str, Any]]
    instance: str
    config_sha: str
