"""Prometheus metrics, names as PRODUCT.md binds them, built against an injected registry.

With ``--workers N`` the supervisor sets PROMETHEUS_MULTIPROC_DIR before the
workers import prometheus_client, so counters and histograms add up across
processes; the rolling gauges use ``mostrecent`` (each worker's window is a
uniform sample of the same traffic, SO_REUSEPORT spreads connections evenly).
"""

from __future__ import annotations

import contextlib
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# `_created` series double the exposition for no use here (Prometheus ignores them).
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
DROP_REASONS = ("saturated", "body_too_large", "overload")


def _remove(metric: Counter | Gauge, *labels: str) -> None:
    """Remove one labelled series if it exists (prometheus_client raises KeyError if not)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class Metrics:
    def __init__(self, registry: CollectorRegistry, window: int = 1000) -> None:
        self.registry = registry
        self.window = window
        r = registry
        self.requests_total = Counter(
            "shadowproxy_requests_total",
            "Upstream responses by route, upstream, role and status code.",
            ["route", "upstream", "role", "code"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "shadowproxy_upstream_latency_seconds",
            "Upstream latency to the complete response.",
            ["route", "upstream", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.comparisons_total = Counter(
            "shadowproxy_comparisons_total",
            "Comparisons of shadow against primary by outcome.",
            ["route", "shadow", "outcome"],
            registry=r,
        )
        self.agreement_ratio = Gauge(
            "shadowproxy_agreement_ratio",
            "Share of agreeing comparisons over the last metrics.window comparable pairs.",
            ["route", "shadow"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.latency_quantile = Gauge(
            "shadowproxy_latency_quantile_seconds",
            "Latency percentile over the last metrics.window responses.",
            ["route", "upstream", "role", "percentile"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.mirror_in_flight = Gauge(
            "shadowproxy_mirror_in_flight",
            "Mirrored requests currently in flight.",
            ["route", "shadow"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.mirror_dropped_total = Counter(
            "shadowproxy_mirror_dropped_total",
            "Mirrors not sent, by reason: saturated, body_too_large, overload.",
            ["route", "shadow", "reason"],
            registry=r,
        )
        self.records_total = Counter(
            "shadowproxy_records_total",
            "Pairs by where they went first: written, spooled, dropped.",
            ["outcome"],
            registry=r,
        )
        self.record_queue_depth = Gauge(
            "shadowproxy_record_queue_depth",
            "Records waiting in memory for the storage writer.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_pending = Gauge(
            "shadowproxy_spool_pending",
            "Records in the spool waiting for the store.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.config_reloads_total = Counter(
            "shadowproxy_config_reloads_total",
            "Config reloads by outcome: ok, error.",
            ["outcome"],
            registry=r,
        )
        self.config_info = Gauge(
            "shadowproxy_config_info",
            "The loaded config's sha256 (value 1).",
            ["sha256"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.promotions_total = Counter(
            "shadowproxy_promotions_total",
            "Promotions performed, by route.",
            ["route"],
            registry=r,
        )
        self.background_errors_total = Counter(
            "shadowproxy_background_errors_total",
            "Exceptions raised by background tasks, by task name.",
            ["task"],
            registry=r,
        )
        self.upstream_retries_total = Counter(
            "shadowproxy_upstream_retries_total",
            "Requests sent once more on a fresh connection after a reused one died unanswered.",
            ["upstream", "role"],
            registry=r,
        )
        self.connections_rejected_total = Counter(
            "shadowproxy_connections_rejected_total",
            "Client connections closed by the listener: header_timeout, send_timeout, max_connections, malformed, internal_error.",
            ["reason"],
            registry=r,
        )
        self._agreements: dict[tuple[str, str], deque[bool]] = {}  # the last `window` each
        self._latencies: dict[tuple[str, str, str], deque[float]] = {}
        self._config_sha = ""
        self._request_children: dict[tuple[str, str, str, str], Counter] = {}
        self._latency_children: dict[tuple[str, str, str], Histogram] = {}
        self._comparison_children: dict[tuple[str, str, str], Counter] = {}
        self._in_flight_children: dict[tuple[str, str], Gauge] = {}
        self._retired: set[tuple[str, str]] = set()  # (route, shadow) pairs a reload removed

    def set_window(self, window: int) -> None:
        """A reload's ``metrics.window``: each rolling window keeps its newest entries."""
        if window == self.window:
            return
        self.window = window
        for key, agreements in self._agreements.items():
            self._agreements[key] = deque(agreements, maxlen=window)
        for lkey, latencies in self._latencies.items():
            self._latencies[lkey] = deque(latencies, maxlen=window)

    def retire_shadow(self, route: str, shadow: str) -> None:
        """A reload removed ``shadow`` from ``route``: its series leave /metrics, and what its
        mirrors still in flight observe later is not exported."""
        key = (route, shadow)
        self._retired.add(key)
        for rkey in [k for k in self._request_children if k[:3] == (route, shadow, "shadow")]:
            self.requests_total.remove(*rkey)
            del self._request_children[rkey]
        latency_key = (route, shadow, "shadow")
        if self._latency_children.pop(latency_key, None) is not None:
            self.upstream_latency.remove(*latency_key)
        if self._latencies.pop(latency_key, None) is not None:
            for name, _ in PERCENTILES:
                _remove(self.latency_quantile, route, shadow, "shadow", name)
        for ckey in [k for k in self._comparison_children if k[:2] == key]:
            self.comparisons_total.remove(*ckey)
            del self._comparison_children[ckey]
        if self._agreements.pop(key, None) is not None:
            _remove(self.agreement_ratio, route, shadow)
        if self._in_flight_children.pop(key, None) is not None:
            # A mirror still in flight holds the child it incremented: its decrement lands
            # there, on a series no longer exported.
            self.mirror_in_flight.remove(route, shadow)
        for reason in DROP_REASONS:
            _remove(self.mirror_dropped_total, route, shadow, reason)

    def restore_shadow(self, route: str, shadow: str) -> None:
        """A reload (re)made ``shadow`` a shadow of ``route``: its series are exported again."""
        self._retired.discard((route, shadow))

    def set_config(self, sha256: str) -> None:
        if self._config_sha:
            self.config_info.remove(self._config_sha)
        self._config_sha = sha256
        self.config_info.labels(sha256=sha256).set(1)

    def observe_upstream(
        self, route: str, upstream: str, role: str, code: str, latency_s: float | None
    ) -> None:
        if self._retired and role == "shadow" and (route, upstream) in self._retired:
            return
        # Children are cached: labels() takes a lock and builds tuples on every call.
        counter = self._request_children.get((route, upstream, role, code))
        if counter is None:
            counter = self.requests_total.labels(route, upstream, role, code)
            self._request_children[(route, upstream, role, code)] = counter
        counter.inc()
        if latency_s is not None:
            key = (route, upstream, role)
            latency = self._latency_children.get(key)
            if latency is None:
                latency = self._latency_children[key] = self.upstream_latency.labels(*key)
            latency.observe(latency_s)
            window = self._latencies.get(key)
            if window is None:
                window = self._latencies[key] = deque(maxlen=self.window)
            window.append(latency_s)

    def observe_comparison(
        self, route: str, shadow: str, outcome: str, agreement: bool | None
    ) -> None:
        if self._retired and (route, shadow) in self._retired:
            return
        counter = self._comparison_children.get((route, shadow, outcome))
        if counter is None:
            counter = self.comparisons_total.labels(route, shadow, outcome)
            self._comparison_children[(route, shadow, outcome)] = counter
        counter.inc()
        if agreement is not None:
            key = (route, shadow)
            window = self._agreements.get(key)
            if window is None:
                window = self._agreements[key] = deque(maxlen=self.window)
            window.append(agreement)

    def mirrors_in_flight(self, route: str, shadow: str) -> Gauge:
        """The in-flight gauge's child for one route and shadow (cached, as above)."""
        gauge = self._in_flight_children.get((route, shadow))
        if gauge is None:
            gauge = self._in_flight_children[(route, shadow)] = self.mirror_in_flight.labels(
                route, shadow
            )
        return gauge

    def refresh_rolling(self) -> None:
        """Recompute the rolling gauges; called periodically, not per request."""
        for (route, shadow), agreements in self._agreements.items():
            if agreements:
                self.agreement_ratio.labels(route, shadow).set(sum(agreements) / len(agreements))
        for (route, upstream, role), latencies in self._latencies.items():
            if not latencies:
                continue
            ordered = sorted(latencies)
            for name, q in PERCENTILES:
                value = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
                self.latency_quantile.labels(route, upstream, role, name).set(value)
