"""Exchange → comparison → metrics → record → recorder. Runs on the event loop, never blocks.

This is the one ``ExchangeSink`` of the running proxy. A failure here is contained:
it is logged and counted as a dropped record, and the request path never sees it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import structlog

from shadowproxy.config.settings import StorageSettings
from shadowproxy.pairs.bodies import decoded
from shadowproxy.pairs.compare import compare_responses
from shadowproxy.pairs.observation import Exchange
from shadowproxy.pairs.record_build import build_record
from shadowproxy.storage.record import Record
from shadowproxy.telemetry.metrics import Metrics

log = structlog.get_logger("shadowproxy.pipeline")

COMPARE_CAP = 4 * 1024 * 1024  # decoded bytes compared at most per side


class RecordSink(Protocol):
    def submit(self, record: Record) -> None: ...


class ComparisonPipeline:
    def __init__(
        self, metrics: Metrics, recorder: RecordSink, storage: StorageSettings, *, instance: str
    ) -> None:
        self._metrics = metrics
        self._recorder = recorder
        self.storage = storage
        self._instance = instance
        self.produced = 0

    def submit(self, exchange: Exchange) -> None:
        self.produced += 1
        try:
            primary = decoded(exchange.primary, COMPARE_CAP)
            shadow = decoded(exchange.shadow, COMPARE_CAP)
            comparison = compare_responses(exchange.compare, primary, shadow)
            self._metrics.observe_comparison(
                exchange.request.route,
                exchange.shadow.upstream,
                comparison.outcome,
                comparison.agreement,
            )
            # Bodies are stored as compared: decoded, so a gzip answer is readable in the row.
            decoded_exchange = (
                exchange
                if primary is exchange.primary and shadow is exchange.shadow
                else replace(exchange, primary=primary, shadow=shadow)
            )
            record = build_record(decoded_exchange, comparison, self.storage, self._instance)
        except Exception as exc:  # contained: a bad pair must not hurt the next one
            log.error("pair_processing_failed", route=exchange.request.route, error=repr(exc))
            self._metrics.background_errors_total.labels("pipeline").inc()
            self._metrics.records_total.labels("dropped").inc()
            return
        self._recorder.submit(record)
