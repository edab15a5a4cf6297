"""Fire-and-forget mirroring: bounded, counted, never awaited by the client's response.

Each mirror job runs as an owned background task. The primary's observation and each
shadow's meet in a ``PairJoin``; whichever side finishes last hands the Exchange to the
sink, so no task ever waits on the other side.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import structlog
from prometheus_client import Gauge

from shadowproxy.base.tasks import TaskGroup
from shadowproxy.config.settings import RouteSettings
from shadowproxy.pairs.observation import (
    Exchange,
    ExchangeSink,
    Observation,
    RequestSnapshot,
    failed,
)
from shadowproxy.proxy.breaker import CircuitBreaker
from shadowproxy.proxy.overload import LoopLagMonitor
from shadowproxy.proxy.runtime import Generation, Runtime
from shadowproxy.proxy.upstream import observe
from shadowproxy.telemetry.metrics import Metrics

log = structlog.get_logger("shadowproxy.mirror")


class PairJoin:
    """Collects the primary observation and N shadow observations of one request."""

    __slots__ = ("_config_sha", "_primary", "_request", "_route", "_sink", "_waiting")

    def __init__(
        self, request: RequestSnapshot, route: RouteSettings, sink: ExchangeSink, config_sha: str
    ) -> None:
        self._request = request
        self._route = route
        self._sink = sink
        self._config_sha = config_sha
        self._primary: Observation | None = None
        self._waiting: list[Observation] = []

    @property
    def capture_limit(self) -> int:
        return self._route.mirror.max_capture_bytes

    def _emit(self, primary: Observation, shadow: Observation) -> None:
        self._sink.submit(
            Exchange(self._request, primary, shadow, self._route.compare, self._config_sha)
        )

    def primary_done(self, primary: Observation) -> None:
        self._primary = primary
        waiting, self._waiting = self._waiting, []
        for shadow in waiting:
            self._emit(primary, shadow)

    def shadow_done(self, shadow: Observation) -> None:
        if self._primary is None:
            self._waiting.append(shadow)
        else:
            self._emit(self._primary, shadow)


class MirrorDispatcher:
    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics,
        sink: ExchangeSink,
        tasks: TaskGroup,
        overload: LoopLagMonitor,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._sink = sink
        self._tasks = tasks
        self._overload = overload
        self._rng = rng
        self.in_flight: dict[tuple[str, str], int] = {}  # by (route, shadow)
        self._upstream_in_flight: dict[str, int] = {}  # by shadow upstream, all routes
        self._drops: dict[tuple[str, str, str], int] = {}
        self.breakers: dict[str, CircuitBreaker] = {}  # by shadow upstream

    def _drop(self, route: str, shadow: str, reason: str) -> None:
        self._metrics.mirror_dropped_total.labels(route, shadow, reason).inc()
        key = (route, shadow, reason)
        self._drops[key] = self._drops.get(key, 0) + 1

    def take_drop_summary(self) -> dict[str, int]:
        """Drops since the last call, as {"route/shadow/reason": count}: one log line per burst."""
        drops, self._drops = self._drops, {}
        return {"/".join(key): count for key, count in sorted(drops.items())}

    def dispatch(
        self,
        generation: Generation,
        route: RouteSettings,
        request: RequestSnapshot,
        headers: list[tuple[str, str]],
    ) -> PairJoin | None:
        """Start the route's mirrors for this request; returns the join the primary must complete."""
        if not route.shadows or (route.sample_rate < 1.0 and self._rng() >= route.sample_rate):
            return None
        if len(request.body) > route.mirror.max_body_bytes:
            for shadow in route.shadows:
                self._drop(route.name, shadow, "body_too_large")
            return None
        if self._overload.overloaded:
            for shadow in route.shadows:
                self._drop(route.name, shadow, "overload")
            return None
        join: PairJoin | None = None
        mirror_headers: list[tuple[str, str]] | None = None  # built only if a mirror is sent
        for shadow in route.shadows:
            key = (route.name, shadow)
            count = self.in_flight.get(key, 0)
            upstream_count = self._upstream_in_flight.get(shadow, 0)
            # Never more in flight than the shadow's pool has connections (all routes together):
            # a mirror that would only wait for one is dropped and counted now, not timed out later.
            if (
                count >= route.mirror.max_in_flight
                or upstream_count >= generation.shadows[shadow].limit
            ):
                self._drop(route.name, shadow, "saturated")
                continue
            # Asked last: a True may be the breaker's one probe, which must then be sent.
            breaker = self.breakers.get(shadow)
            if breaker is None:
                breaker = self.breakers[shadow] = CircuitBreaker()
            if not breaker.allow():
                # The shadow refuses connections: record the pair now, dial nothing.
                if join is None:
                    join = PairJoin(request, route, self._sink, generation.settings.sha256)
                self._metrics.observe_upstream(route.name, shadow, "shadow", "circuit_open", None)
                join.shadow_done(failed(shadow, "circuit_open"))
                continue
            if join is None:
                join = PairJoin(request, route, self._sink, generation.settings.sha256)
            if mirror_headers is None:
                marker = route.mirror.header.lower()
                mirror_headers = [(k, v) for k, v in headers if k.lower() != marker]
                mirror_headers.append((route.mirror.header, "1"))
            self.in_flight[key] = count + 1
            self._upstream_in_flight[shadow] = upstream_count + 1
            gauge = self._metrics.mirrors_in_flight(route.name, shadow)
            gauge.inc()  # decremented on this child even if a reload retires the series
            self._runtime.acquire(generation)  # released when the mirror finishes
            self._tasks.spawn(
                self._mirror(generation, route.name, shadow, request, mirror_headers, join, gauge),
                name=f"mirror:{route.name}:{shadow}",
            )
        return join

    async def _mirror(
        self,
        generation: Generation,
        route: str,
        shadow: str,
        request: RequestSnapshot,
        headers: list[tuple[str, str]],
        join: PairJoin,
        in_flight_gauge: Gauge,
    ) -> None:
        key = (route, shadow)
        try:
            raw_path = request.path + ("?" + request.query if request.query else "")
            observation = await observe(
                generation.shadows[shadow],
                request.method,
                raw_path,
                headers,
                request.body,
                join.capture_limit,
            )
        finally:
            self.in_flight[key] -= 1
            self._upstream_in_flight[shadow] -= 1
            in_flight_gauge.dec()
            self._runtime.release(generation)
        breaker = self.breakers.get(shadow)
        if breaker is not None and breaker.record(refused=observation.error == "connect"):
            event = "shadow_circuit_open" if breaker.is_open else "shadow_circuit_closed"
            log.warning(event, route=route, shadow=shadow)
        code = (
            str(observation.status)
            if observation.status is not None
            else observation.error or "error"
        )
        self._metrics.observe_upstream(route, shadow, "shadow", code, observation.latency_ms / 1000)
        join.shadow_done(observation)
