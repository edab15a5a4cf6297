"""Typed, immutable configuration: what routes.yaml parses into.

Every runtime component receives these frozen objects, never raw dicts.
Parsing and validation (with file:line errors) live in ``config/load.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    # All request bodies held in memory at once; past it a request gets 503 unread.
    max_buffered_body_bytes: int = 512 * 1024 * 1024
    # Client-side deadlines (nginx client_header_timeout / client_body_timeout / keepalive_timeout).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 10_000
    # A client that stops reading an answer is cut after this long without progress.
    send_timeout_s: float = 60.0
    # In-flight client requests are given this long to finish on SIGTERM.
    shutdown_grace_s: float = 30.0
    access_log: bool = False


@dataclass(frozen=True, slots=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 9901
    token_env: str = "SHADOWPROXY_ADMIN_TOKEN"
    watch_config: bool = True


@dataclass(frozen=True, slots=True)
class RedactSettings:
    headers: tuple[str, ...] = ("authorization", "cookie", "proxy-authorization")
    json: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StorageSettings:
    url: str = "sqlite:///shadowproxy.db"
    queue_max: int = 100_000
    spool_dir: str = "./spool"
    store_bodies: bool = True
    max_stored_body_bytes: int = 65_536
    redact: RedactSettings = field(default_factory=RedactSettings)
    retention_days: int = 30
    batch_size: int = 500
    flush_interval_ms: int = 200


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    window: int = 1000


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    name: str
    url: str  # origin only: scheme://host[:port]
    base_path: str = ""  # the URL's path, put before every request path ("/v1/base")
    timeout_ms: int = 60_000  # until the response head
    idle_timeout_ms: int = 60_000  # between two body reads: a stream that keeps sending lives
    connect_timeout_ms: int = 2_000
    # Pooled connections idle longer than this are dropped, before a typical model server
    # (uvicorn: 5 s) closes them under a request.
    keepalive_idle_ms: int = 4_000
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class MatchSettings:
    path_prefix: str | None = None
    path: str | None = None
    methods: tuple[str, ...] = ()  # empty: any method
    host: str | None = None


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    max_in_flight: int = 200
    max_body_bytes: int = 1024 * 1024
    header: str = "X-Shadow-Request"
    # Each side's answer is compared up to this many bytes; storage keeps at most
    # storage.max_stored_body_bytes of it. Longer answers are `truncated` pairs.
    max_capture_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """The route's comparison rule, presets already applied (explicit keys win)."""

    preset: str | None = None
    label: str | None = None  # JMESPath
    score: str | None = None  # JMESPath
    tolerance: float = 0.0
    ignore: tuple[str, ...] = ()  # JMESPath-like dotted paths dropped before whole-body compare
    similarity: float | None = None  # text labels: agreement when similarity >= this


@dataclass(frozen=True, slots=True)
class GateSettings:
    min_samples: int = 100
    min_agreement: float = 0.95
    max_latency_ratio: float = 1.2
    min_score_delta: float = 0.0
    max_shadow_error_rate: float = 0.01


@dataclass(frozen=True, slots=True)
class RouteSettings:
    name: str
    match: MatchSettings
    primary: str
    shadows: tuple[str, ...] = ()
    sample_rate: float = 1.0
    mirror: MirrorSettings = field(default_factory=MirrorSettings)
    compare: CompareSettings = field(default_factory=CompareSettings)
    gate: GateSettings = field(default_factory=GateSettings)


@dataclass(frozen=True, slots=True)
class Settings:
    upstreams: dict[str, UpstreamSettings]
    routes: tuple[RouteSettings, ...]
    server: ServerSettings = field(default_factory=ServerSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    # Where it came from: the file's path and the sha256 of its bytes.
    path: str = ""
    sha256: str = ""

    def route(self, name: str) -> RouteSettings | None:
        return next((r for r in self.routes if r.name == name), None)
