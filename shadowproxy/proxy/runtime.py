"""The one mutable thing on the request path: which config generation serves new requests.

A reload builds and validates a whole new ``Generation`` and swaps one reference.
Requests (and their mirrors) hold the generation they started with, so in-flight work
finishes on the old routes and pools; pools nobody uses any more close once drained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from shadowproxy.base.tasks import TaskGroup
from shadowproxy.config.settings import Settings, UpstreamSettings
from shadowproxy.proxy.routing import RouteTable
from shadowproxy.proxy.upstream import UpstreamClient

log = structlog.get_logger("shadowproxy.runtime")

ClientKey = tuple[str, UpstreamSettings, int]  # (role, settings, pool limit)


@dataclass(eq=False)
class Generation:
    settings: Settings
    table: RouteTable
    primaries: dict[str, UpstreamClient]
    shadows: dict[str, UpstreamClient]  # keyed by upstream name
    in_use: int = 0
    retired: bool = False
    clients: dict[ClientKey, UpstreamClient] = field(default_factory=dict)


def _shadow_limit(settings: Settings, name: str) -> int:
    # A shadow's pool never needs more connections than the mirrors all its routes may have
    # in flight to it; never more than its max_connections, whichever routes share it.
    limits = [r.mirror.max_in_flight for r in settings.routes if name in r.shadows]
    return min(settings.upstreams[name].max_connections, max(sum(limits), 1))


class Runtime:
    def __init__(
        self,
        settings: Settings,
        tasks: TaskGroup,
        *,
        on_retry: Callable[[str, str], None] = lambda upstream, role: None,
    ) -> None:
        self._tasks = tasks
        self._on_retry = on_retry
        self._retired: list[Generation] = []
        self.current = self._build(settings, {})

    @property
    def settings(self) -> Settings:
        return self.current.settings

    def _build(self, settings: Settings, reuse: dict[ClientKey, UpstreamClient]) -> Generation:
        clients: dict[ClientKey, UpstreamClient] = {}

        def client(role: str, upstream: UpstreamSettings, limit: int) -> UpstreamClient:
            key = (role, upstream, limit)
            if key not in clients:
                clients[key] = reuse.get(key) or UpstreamClient(
                    upstream,
                    role,
                    limit=limit,
                    on_retry=lambda: self._on_retry(upstream.name, role),
                )
            return clients[key]

        used_as_primary = {r.primary for r in settings.routes}
        used_as_shadow = {s for r in settings.routes for s in r.shadows}
        primaries = {
            name: client(
                "primary", settings.upstreams[name], settings.upstreams[name].max_connections
            )
            for name in used_as_primary
        }
        shadows = {
            name: client("shadow", settings.upstreams[name], _shadow_limit(settings, name))
            for name in used_as_shadow
        }
        return Generation(
            settings, RouteTable(settings.routes), primaries, shadows, clients=clients
        )

    def acquire(self, generation: Generation | None = None) -> Generation:
        """Hold ``generation`` (default: the current one) until ``release``: its routes and
        pools stay open while a request or a mirror of it is in flight."""
        if generation is None:
            generation = self.current
        generation.in_use += 1
        return generation

    def release(self, generation: Generation) -> None:
        generation.in_use -= 1
        if generation.retired and generation.in_use == 0:
            self._close_unused(generation)

    def swap(self, settings: Settings) -> dict[str, Any]:
        """Make ``settings`` serve new requests; return what changed."""
        old = self.current
        new = self._build(settings, old.clients)
        self.current = new
        old.retired = True
        if old.in_use == 0:
            self._close_unused(old)
        else:
            self._retired.append(old)
        return describe_changes(old.settings, settings)

    def _close_unused(self, generation: Generation) -> None:
        live = {id(c) for c in self.current.clients.values()}
        for retired in self._retired:
            if retired is not generation:
                live.update(id(c) for c in retired.clients.values())
        self._retired = [g for g in self._retired if g is not generation and g.in_use > 0]
        for key, client in generation.clients.items():
            if id(client) not in live:
                log.info("upstream_pool_closed", upstream=key[1].name, role=key[0])
                self._tasks.spawn(client.close(), name=f"close-pool:{key[1].name}")
        generation.clients = {}

    async def close(self) -> None:
        clients = {id(c): c for c in self.current.clients.values()}
        for generation in self._retired:
            clients.update({id(c): c for c in generation.clients.values()})
        for client in clients.values():
            await client.close()


# What a running process cannot take from a reload: bound sockets, the open store, the spool
# directory, the admin token read at start. Everything else in routes.yaml applies at once.
_RESTART_KEYS = (
    ("server", "host"),
    ("server", "port"),
    ("admin", "host"),
    ("admin", "port"),
    ("admin", "token_env"),
    ("admin", "watch_config"),
    ("storage", "url"),
    ("storage", "spool_dir"),
)


def restart_required(old: Settings, new: Settings) -> list[str]:
    """The changed keys (``server.port``) that take effect only after a restart."""
    return [
        f"{section}.{key}"
        for section, key in _RESTART_KEYS
        if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)
    ]


def describe_changes(old: Settings, new: Settings) -> dict[str, Any]:
    old_routes = {r.name: r for r in old.routes}
    new_routes = {r.name: r for r in new.routes}
    return {
        "sha256": {"old": old.sha256, "new": new.sha256},
        "routes_added": sorted(set(new_routes) - set(old_routes)),
        "routes_removed": sorted(set(old_routes) - set(new_routes)),
        "routes_changed": sorted(
            n for n in set(old_routes) & set(new_routes) if old_routes[n] != new_routes[n]
        ),
        "upstreams_added": sorted(set(new.upstreams) - set(old.upstreams)),
        "upstreams_removed": sorted(set(old.upstreams) - set(new.upstreams)),
        "upstreams_changed": sorted(
            n
            for n in set(old.upstreams) & set(new.upstreams)
            if old.upstreams[n] != new.upstreams[n]
        ),
    }
