"""Why a call gave no usable answer: the ``error`` of an observation and ``shadow_error`` of a pair.

One vocabulary for the proxy (which produces the transport kinds), the comparison (which adds
the answer kinds), the stores (column ``shadow_error``), the report ("shadow error rate by
kind") and the metrics (``code`` label of ``shadowproxy_requests_total`` when no status
arrived). README's "Error kinds" lists the same names.
"""

from __future__ import annotations

from typing import Literal, get_args

# No answer from the upstream (``Observation.error``).
TransportErrorKind = Literal[
    "timeout",  # no response head within timeout_ms, or idle_timeout_ms of silence mid-body
    "connect",  # connection refused or not established
    "reset",  # the connection died (reset, closed, OS error)
    "protocol",  # not HTTP we accept (bad head, non-ASCII headers, unknown transfer-coding)
    "pool_exhausted",  # primary only: no connection free in the pool in time
    "circuit_open",  # shadow only: refused repeatedly, not dialled for a while
]

# An answer the comparison cannot use (``Comparison.shadow_error`` adds these).
AnswerErrorKind = Literal[
    "no_response",  # neither a status nor a named transport error
    "status_5xx",  # the shadow answered 5xx
    "truncated",  # the shadow's body was cut at the capture limit
    "not_json",  # a 2xx that is not JSON where the primary's is
    "label_missing",  # the label expression found nothing in the shadow's body
]

ErrorKind = TransportErrorKind | AnswerErrorKind

TRANSPORT_ERROR_KINDS: tuple[str, ...] = get_args(TransportErrorKind)
ERROR_KINDS: tuple[str, ...] = (*TRANSPORT_ERROR_KINDS, *get_args(AnswerErrorKind))
