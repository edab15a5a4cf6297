"""Plain data handed from the request path to the comparison and the recorder.

An ``Observation`` is one side's answer (value or error, plus duration), in the
spirit of github/scientist; an ``Exchange`` is the request and both answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shadowproxy.base.error_kinds import TransportErrorKind
from shadowproxy.config.settings import CompareSettings


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    request_id: str
    ts: float  # unix seconds when the proxy received the request
    route: str
    method: str
    path: str
    query: str  # raw query string without '?'
    headers: tuple[tuple[str, str], ...]  # as received, hop-by-hop removed
    body: bytes


@dataclass(frozen=True, slots=True)
class Observation:
    upstream: str
    status: int | None  # None when no response head arrived
    headers: tuple[tuple[str, str], ...]
    body: bytes  # captured body, at most the capture limit
    body_truncated: bool
    latency_ms: float  # time to the complete (captured) body, or to the error
    # Transport failure kind (shadowproxy.base.error_kinds), None when a full response arrived
    error: TransportErrorKind | None = None


def failed(upstream: str, error: TransportErrorKind, latency_ms: float = 0.0) -> Observation:
    """The observation of a call that produced no answer."""
    return Observation(
        upstream=upstream,
        status=None,
        headers=(),
        body=b"",
        body_truncated=False,
        latency_ms=latency_ms,
        error=error,
    )


@dataclass(frozen=True, slots=True)
class Exchange:
    """One (request, shadow) pair: what compare and record consume."""

    request: RequestSnapshot
    primary: Observation
    shadow: Observation
    compare: CompareSettings  # the route's rule at the time of the request
    config_sha: str


class ExchangeSink(Protocol):
    """Where the mirror hands finished pairs. Must never block or raise."""

    def submit(self, exchange: Exchange) -> None: ...
