"""One running proxy process: its components, their start and stop order, and its control plane.

Data flows one way: request → ProxyHandler → primary; ProxyHandler → MirrorDispatcher →
ComparisonPipeline → Recorder → Store; Metrics on the side. ``Service`` also implements
the admin ``ControlPlane`` (status, readiness, reload, promote).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from shadowproxy.base.errors import ConfigError
from shadowproxy.base.tasks import TaskGroup
from shadowproxy.config.load import load_settings
from shadowproxy.config.settings import Settings
from shadowproxy.config.watcher import ConfigWatcher
from shadowproxy.control.promotion import swap_primary
from shadowproxy.http.listener import ProxyServer, assert_c_parser
from shadowproxy.pairs.pipeline import ComparisonPipeline
from shadowproxy.proxy.handler import ProxyHandler
from shadowproxy.proxy.mirror import MirrorDispatcher
from shadowproxy.proxy.overload import LoopLagMonitor
from shadowproxy.proxy.request_body import BodyBudget
from shadowproxy.proxy.runtime import Runtime, restart_required
from shadowproxy.storage import default_instance, open_store
from shadowproxy.storage.base import PromotionRecord
from shadowproxy.storage.recorder import Recorder
from shadowproxy.telemetry.metrics import Metrics

log = structlog.get_logger("shadowproxy.service")


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line values that win over routes.yaml, on every (re)load."""

    host: str | None = None
    port: int | None = None
    admin_host: str | None = None
    admin_port: int | None = None
    database_url: str | None = None

    def apply(self, settings: Settings) -> Settings:
        server = settings.server
        if self.host is not None or self.port is not None:
            server = dataclasses.replace(
                server,
                host=self.host if self.host is not None else server.host,
                port=self.port if self.port is not None else server.port,
            )
        admin = settings.admin
        if self.admin_host is not None or self.admin_port is not None:
            admin = dataclasses.replace(
                admin,
                host=self.admin_host if self.admin_host is not None else admin.host,
                port=self.admin_port if self.admin_port is not None else admin.port,
            )
        storage = settings.storage
        if self.database_url:
            storage = dataclasses.replace(storage, url=self.database_url)
        return dataclasses.replace(settings, server=server, admin=admin, storage=storage)


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        overrides: Overrides = Overrides(),
        registry: CollectorRegistry | None = None,
        instance: str = "",
        worker_index: int = 0,
        reuse_port: bool = False,
        notify_siblings: bool = False,
    ) -> None:
        self.config_path = settings.path
        self.overrides = overrides
        self.instance = instance or os.environ.get("SHADOWPROXY_INSTANCE") or default_instance()
        self.worker_index = worker_index
        self.reuse_port = reuse_port
        self.notify_siblings = notify_siblings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, window=settings.metrics.window)
        self.tasks = TaskGroup(on_error=self._background_error)
        self.mirror_tasks = TaskGroup(on_error=self._background_error)
        self.promotion_tasks = TaskGroup(on_error=self._background_error)
        self.overload = LoopLagMonitor()
        self.runtime = Runtime(
            settings,
            self.tasks,
            on_retry=lambda upstream, role: self.metrics.upstream_retries_total.labels(
                upstream, role
            ).inc(),
        )
        self.loaded_at = time.time()
        self.store = open_store(settings.storage.url, instance=self.instance)
        self.recorder = Recorder(self.store, settings.storage, self.metrics, instance=self.instance)
        self.pipeline = ComparisonPipeline(
            self.metrics, self.recorder, settings.storage, instance=self.instance
        )
        self.dispatcher = MirrorDispatcher(
            self.runtime,
            self.metrics,
            self.pipeline,
            self.mirror_tasks,
            self.overload,
        )
        self.body_budget = BodyBudget(settings.server.max_buffered_body_bytes)
        self.handler = ProxyHandler(self.runtime, self.dispatcher, self.metrics, self.body_budget)
        self.watcher: ConfigWatcher | None = None
        self._reload_lock = asyncio.Lock()
        self.proxy_server: ProxyServer | None = None
        self.admin_runner: web.AppRunner | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self.metrics.set_config(settings.sha256)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def _background_error(self, name: str, exc: BaseException) -> None:
        self.metrics.background_errors_total.labels(name.split(":", 1)[0]).inc()

    # Lifecycle --------------------------------------------------------------
    async def start(self, *, admin: bool = True) -> None:
        settings = self.settings
        await self.recorder.start()
        self.tasks.spawn(self.overload.run(), name="loop-lag-monitor")
        self.tasks.spawn(self._refresh_rolling_metrics(), name="rolling-metrics")
        assert_c_parser()
        self.proxy_server = ProxyServer(
            self.handler,
            header_timeout_s=settings.server.header_timeout_s,
            send_timeout_s=settings.server.send_timeout_s,
            keepalive_timeout_s=settings.server.keepalive_timeout_s,
            max_connections=settings.server.max_connections,
            shutdown_grace_s=settings.server.shutdown_grace_s,
            on_reject=lambda reason: self.metrics.connections_rejected_total.labels(reason).inc(),
        )
        await self.proxy_server.start(
            settings.server.host, settings.server.port, reuse_port=self.reuse_port
        )
        self.proxy_port = self.proxy_server.port
        if admin:
            from shadowproxy.control.admin import build_admin_app

            token = os.environ.get(settings.admin.token_env) or None
            app = build_admin_app(
                self,
                token=token,
                token_env=settings.admin.token_env,
                metrics_text=self.metrics_text,
            )
            self.admin_runner = web.AppRunner(app, access_log=None)
            await self.admin_runner.setup()
            await web.TCPSite(self.admin_runner, settings.admin.host, settings.admin.port).start()
            self.admin_port = _bound_port(self.admin_runner)
        if settings.admin.watch_config and self.config_path:
            self.watcher = ConfigWatcher(
                self.config_path, self._reload_from_watcher, interval_s=1.0
            )
            self.watcher.acknowledge(settings.sha256)
            self.watcher.start()
        log.info(
            "started",
            proxy=f"{settings.server.host}:{self.proxy_port}",
            admin=f"{settings.admin.host}:{self.admin_port}" if admin else None,
            config=self.config_path,
            sha256=settings.sha256,
            storage=self.store.backend,
            instance=self.instance,
        )

    async def stop(self) -> None:
        """Stop taking connections, let in-flight requests finish, flush records."""
        started = time.monotonic()
        if self.watcher is not None:
            await self.watcher.stop()
        grace = self.settings.server.shutdown_grace_s
        if self.proxy_server is not None:
            await self.proxy_server.close()  # stops listening, lets in-flight requests end
        leftover = await self.mirror_tasks.wait(
            deadline_s=max(1.0, grace - (time.monotonic() - started))
        )
        cancelled = await self.mirror_tasks.cancel_all() if leftover else 0
        await self.promotion_tasks.wait(
            deadline_s=5.0
        )  # the recorder defers them if the store is down
        await self.recorder.close(timeout=max(5.0, grace))
        await self.tasks.cancel_all()
        await self.runtime.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        log.info(
            "stopped",
            seconds=round(time.monotonic() - started, 3),
            mirrors_cancelled=cancelled,
            records=self.recorder.status(),
        )

    async def _refresh_rolling_metrics(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 10 == 0:
                drops = self.dispatcher.take_drop_summary()
                if drops:
                    log.warning("mirrors_dropped", window_s=10, drops=drops)
            self.metrics.refresh_rolling()
            status = self.recorder.status()
            self.metrics.record_queue_depth.set(status.get("queue_depth", 0))
            self.metrics.spool_pending.set(status.get("spool_pending", 0))

    def metrics_text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.metrics.refresh_rolling()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # Control plane ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "config": {
                "path": self.config_path,
                "sha256": settings.sha256,
                "loaded_at": _iso(self.loaded_at),
            },
            "routes": [
                {
                    "name": r.name,
                    "primary": r.primary,
                    "shadows": list(r.shadows),
                    "sample_rate": r.sample_rate,
                    "mirror_in_flight": {
                        s: self.dispatcher.in_flight.get((r.name, s), 0) for s in r.shadows
                    },
                }
                for r in settings.routes
            ],
            "storage": self.recorder.status(),
            "instance": self.instance,
            "worker": self.worker_index,
            "pid": os.getpid(),
            "overloaded": self.overload.overloaded,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        status = self.recorder.status()
        ok = self.recorder.ready
        return ok, {"config": self.settings.sha256, "storage": status, "ready": ok}

    async def reload(self, *, source: str = "admin") -> dict[str, Any]:
        """Validate the file fully, then swap; on error keep serving the old config."""
        async with self._reload_lock:
            outcome = self._reload_locked(source)
        if source == "admin" and self.notify_siblings:
            os.kill(os.getppid(), signal.SIGHUP)  # the supervisor passes it to every worker
        return outcome

    def _reload_locked(self, source: str) -> dict[str, Any]:
        try:
            new = self.overrides.apply(load_settings(self.config_path))
        except ConfigError as exc:
            self.metrics.config_reloads_total.labels("error").inc()
            log.error("config_reload_failed", source=source, error=str(exc))
            raise
        old = self.settings
        restart = restart_required(old, new)
        if restart:
            log.warning("config_change_needs_restart", keys=restart)
        changes = self.runtime.swap(new)
        self._retire_removed_shadows(old, new)
        changes["restart_required"] = restart
        self.recorder.apply(new.storage)
        self.metrics.set_window(new.metrics.window)
        if self.proxy_server is not None:
            self.proxy_server.apply(new.server)
        self.body_budget.limit = new.server.max_buffered_body_bytes
        self.dispatcher.breakers.clear()  # upstreams may have moved: dial them afresh
        if source != "promote":
            self._record_file_promotions(old, new)
        self.pipeline.storage = new.storage
        self.loaded_at = time.time()
        self.metrics.config_reloads_total.labels("ok").inc()
        self.metrics.set_config(new.sha256)
        if self.watcher is not None:
            self.watcher.acknowledge(new.sha256)
        log.info("config_reloaded", source=source, **changes)
        return {"reloaded": True, "changes": changes}

    def _retire_removed_shadows(self, old: Settings, new: Settings) -> None:
        """Series of a (route, shadow) the reload removed (a promotion, an edit) disappear."""
        before = {(r.name, s) for r in old.routes for s in r.shadows}
        after = {(r.name, s) for r in new.routes for s in r.shadows}
        for route, shadow in before - after:
            self.metrics.retire_shadow(route, shadow)
        for route, shadow in after:
            self.metrics.restore_shadow(route, shadow)

    def _record_file_promotions(self, old: Settings, new: Settings) -> None:
        """A reload that makes one of a route's shadows its primary is a promotion made in the
        file (by hand, `shadowproxy promote`, a ConfigMap edit): record it. Every replica sees
        the same edit; the store keeps one row per (route, config sha)."""
        for route in new.routes:
            before = old.route(route.name)
            if (
                before is None
                or route.primary == before.primary
                or route.primary not in before.shadows
            ):
                continue
            log.info(
                "promoted",
                route=route.name,
                previous_primary=before.primary,
                new_primary=route.primary,
                source="file",
            )
            promotion = PromotionRecord(
                ts=time.time(),
                route=route.name,
                previous_primary=before.primary,
                new_primary=route.primary,
                config_sha=new.sha256,
                instance=self.instance,
            )
            self.promotion_tasks.spawn(
                self._record_file_promotion(promotion), name=f"record-promotion:{route.name}"
            )

    async def _record_file_promotion(self, promotion: PromotionRecord) -> None:
        # Counted by the one replica whose row was stored, so the fleet's total is one.
        if await self.recorder.record_promotion(promotion):
            self.metrics.promotions_total.labels(promotion.route).inc()

    async def _reload_from_watcher(self) -> None:
        with contextlib.suppress(ConfigError):  # logged and counted; the old config keeps serving
            await self.reload(source="watcher")

    async def promote(self, route: str, shadow: str | None) -> dict[str, Any]:
        async with self._reload_lock:  # one promotion or reload at a time: no lost update
            result = await asyncio.to_thread(swap_primary, self.config_path, route, shadow)
            outcome = self._reload_locked("promote")
        self.metrics.promotions_total.labels(route).inc()
        await self.recorder.record_promotion(
            PromotionRecord(
                ts=time.time(),
                route=route,
                previous_primary=result.previous_primary,
                new_primary=result.new_primary,
                config_sha=result.new_sha256,
                instance=self.instance,
            )
        )
        log.info(
            "promoted",
            route=route,
            previous_primary=result.previous_primary,
            new_primary=result.new_primary,
        )
        if self.notify_siblings:
            os.kill(os.getppid(), signal.SIGHUP)  # the supervisor tells the other workers
        return {
            "route": route,
            "previous_primary": result.previous_primary,
            "new_primary": result.new_primary,
            "sha256": result.new_sha256,
            "changes": outcome["changes"],
        }


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return 0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
