"""routes.yaml → frozen ``Settings``, validated once, every error as ``file:line: key: message``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import jmespath
import jmespath.exceptions

from shadowproxy.base.errors import ConfigError
from shadowproxy.config.ignore_paths import parse_path
from shadowproxy.config.settings import (
    AdminSettings,
    CompareSettings,
    GateSettings,
    MatchSettings,
    MetricsSettings,
    MirrorSettings,
    RedactSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    UpstreamSettings,
)
from shadowproxy.config.yamlnodes import Node, compose

T = TypeVar("T")

_TOP = frozenset({"version", "server", "admin", "storage", "metrics", "upstreams", "routes"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STORAGE_SCHEMES = ("postgresql", "postgres", "sqlite", "jsonl")


def load_settings(path: str) -> Settings:
    """Read and validate routes.yaml. Raises ConfigError naming file, line and key."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=path) from exc
    return parse_settings(raw, path)


def parse_settings(raw: bytes, path: str) -> Settings:
    name = os.path.basename(path) or path
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=name) from exc
    root = compose(text, name)
    if root is None:
        raise ConfigError("empty config: 'upstreams' and 'routes' are required", path=name)
    top = root.items(_TOP)
    if "version" in top and top["version"].as_int() != 1:
        raise top["version"].error("unsupported version (expected 1)")
    for required in ("upstreams", "routes"):
        if required not in top:
            raise root.error(f"missing required key '{required}'")
    upstreams = _upstreams(top["upstreams"])
    routes = _routes(top["routes"], upstreams)
    return Settings(
        upstreams=upstreams,
        routes=routes,
        server=_server(top["server"]) if "server" in top else ServerSettings(),
        admin=_admin(top["admin"]) if "admin" in top else AdminSettings(),
        storage=_storage(top["storage"]) if "storage" in top else StorageSettings(),
        metrics=_metrics(top["metrics"]) if "metrics" in top else MetricsSettings(),
        path=os.path.abspath(path),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _build(cls: type[T], node: Node, convert: dict[str, Callable[[Node], Any]], **fixed: Any) -> T:
    """Build dataclass ``cls`` from a mapping node: each key converted, unknown keys rejected."""
    entries = node.items(frozenset(convert))
    values = {key: convert[key](child) for key, child in entries.items()}
    return cls(**fixed, **values)


def _port(n: Node) -> int:
    return n.as_int(0, 65535)


def _positive(n: Node) -> int:
    return n.as_int(1)


def _non_negative(n: Node) -> int:
    return n.as_int(0)


def _seconds(n: Node) -> float:
    return n.as_float(0.001)


def _server(node: Node) -> ServerSettings:
    return _build(
        ServerSettings,
        node,
        {
            "host": Node.as_str,
            "port": _port,
            "max_body_bytes": _positive,
            "max_buffered_body_bytes": _positive,
            "header_timeout_s": _seconds,
            "body_timeout_s": _seconds,
            "keepalive_timeout_s": _seconds,
            "send_timeout_s": _seconds,
            "max_connections": _positive,
            "shutdown_grace_s": lambda n: n.as_float(0),
            "access_log": Node.as_bool,
        },
    )


def _admin(node: Node) -> AdminSettings:
    return _build(
        AdminSettings,
        node,
        {
            "host": Node.as_str,
            "port": _port,
            "token_env": Node.as_str,
            "watch_config": Node.as_bool,
        },
    )


def _storage_url(n: Node) -> str:
    url = n.as_str()
    check_storage_url(url, n.error)
    return url


def check_storage_url(url: str, error: Callable[[str], Exception]) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in _STORAGE_SCHEMES:
        raise error(
            f"unsupported storage url {url!r} (expected postgresql://user@host/db, "
            "sqlite:///path.db or jsonl:///path/to/dir)"
        )


def _redact(node: Node) -> RedactSettings:
    return _build(
        RedactSettings,
        node,
        {
            "headers": lambda n: tuple(h.lower() for h in n.str_list()),
            "json": Node.str_list,
        },
    )


def _storage(node: Node) -> StorageSettings:
    return _build(
        StorageSettings,
        node,
        {
            "url": _storage_url,
            "queue_max": _positive,
            "spool_dir": Node.as_str,
            "store_bodies": Node.as_bool,
            "max_stored_body_bytes": _non_negative,
            "redact": _redact,
            "retention_days": _non_negative,
            "batch_size": _positive,
            "flush_interval_ms": _positive,
        },
    )


def _metrics(node: Node) -> MetricsSettings:
    return _build(MetricsSettings, node, {"window": _positive})


def _upstream_url(n: Node) -> str:
    url = n.as_str()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise n.error(
            f"expected an absolute http(s) URL such as http://127.0.0.1:9001, got {url!r}"
        )
    if parts.query or parts.fragment:
        raise n.error("an upstream URL takes no query or fragment")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise n.error(f"invalid port in {url!r}") from None
    return url.rstrip("/")


def split_base_path(url: str) -> tuple[str, str]:
    """``http://h:1/v1/base`` → (``http://h:1``, ``/v1/base``): the path prefixes every request."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")


def _upstreams(node: Node) -> dict[str, UpstreamSettings]:
    out: dict[str, UpstreamSettings] = {}
    entries = node.items()
    if not entries:
        raise node.error("at least one upstream is required")
    for name, child in entries.items():
        if child.is_null() or "url" not in child.items():
            raise child.error("missing required key 'url'")
        upstream = _build(
            UpstreamSettings,
            child,
            {
                "url": _upstream_url,
                "timeout_ms": _positive,
                "idle_timeout_ms": _positive,
                "connect_timeout_ms": _positive,
                "keepalive_idle_ms": _non_negative,
                "max_connections": _positive,
            },
            name=name,
        )
        origin, base_path = split_base_path(upstream.url)
        out[name] = dataclasses.replace(upstream, url=origin, base_path=base_path)
    return out


def _path(n: Node) -> str:
    value = n.as_str()
    if not value.startswith("/"):
        raise n.error(f"must start with '/', got {value!r}")
    return value


def _methods(n: Node) -> tuple[str, ...]:
    methods = []
    for element in n.elements():
        method = element.as_str().upper()
        if method not in _METHODS:
            raise element.error(f"unknown HTTP method {method!r}")
        methods.append(method)
    return tuple(methods)


def _match(node: Node) -> MatchSettings:
    match = _build(
        MatchSettings,
        node,
        {
            "path_prefix": _path,
            "path": _path,
            "methods": _methods,
            "host": lambda n: n.as_str().lower(),
        },
    )
    if match.path is not None and match.path_prefix is not None:
        raise node.error("give either 'path' or 'path_prefix', not both")
    return match


def _mirror(node: Node) -> MirrorSettings:
    return _build(
        MirrorSettings,
        node,
        {
            "max_in_flight": _positive,
            "max_body_bytes": _non_negative,
            "max_capture_bytes": _positive,
            "header": Node.as_str,
        },
    )


def _jmespath(n: Node) -> str:
    expression = n.as_str()
    try:
        jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise n.error(f"invalid JMESPath expression {expression!r}: {exc}") from None
    return expression


def _ignore_paths(n: Node) -> tuple[str, ...]:
    paths = []
    for element in n.elements():
        path = element.as_str()
        try:
            parse_path(path)
        except ValueError as exc:
            raise element.error(str(exc)) from None
        paths.append(path)
    return tuple(paths)


_COMPARE_KEYS: dict[str, Callable[[Node], Any]] = {
    "preset": Node.as_str,
    "label": _jmespath,
    "score": _jmespath,
    "tolerance": lambda n: n.as_float(0),
    "ignore": _ignore_paths,
    "similarity": lambda n: n.as_float(0, 1),
}


def _compare(node: Node) -> CompareSettings:
    from shadowproxy.config.presets import apply_preset

    entries = node.items(frozenset(_COMPARE_KEYS))
    explicit = {
        key: _COMPARE_KEYS[key](child) for key, child in entries.items() if not child.is_null()
    }
    preset = explicit.pop("preset", None)
    try:
        merged = apply_preset(preset, explicit)
    except ValueError as exc:
        raise entries["preset"].error(str(exc)) from None
    label, score, similarity = merged.get("label"), merged.get("score"), merged.get("similarity")
    return CompareSettings(
        preset=preset,
        label=str(label) if label is not None else None,
        score=str(score) if score is not None else None,
        tolerance=float(cast(float, merged.get("tolerance", 0.0))),
        ignore=tuple(str(p) for p in cast(tuple[str, ...], merged.get("ignore", ()))),
        similarity=float(cast(float, similarity)) if similarity is not None else None,
    )


def _gate(node: Node) -> GateSettings:
    return _build(
        GateSettings,
        node,
        {
            "min_samples": _non_negative,
            "min_agreement": lambda n: n.as_float(0, 1),
            "max_latency_ratio": lambda n: n.as_float(0),
            "min_score_delta": Node.as_float,
            "max_shadow_error_rate": lambda n: n.as_float(0, 1),
        },
    )


_ROUTE_KEYS = frozenset(
    {"name", "match", "primary", "shadows", "sample_rate", "mirror", "compare", "gate"}
)


def _routes(node: Node, upstreams: dict[str, UpstreamSettings]) -> tuple[RouteSettings, ...]:
    routes: list[RouteSettings] = []
    seen: set[str] = set()
    for element in node.elements():
        entries = element.items(_ROUTE_KEYS)
        for required in ("name", "primary"):
            if required not in entries:
                raise element.error(f"missing required key '{required}'")
        name = entries["name"].as_str()
        if name in seen:
            raise entries["name"].error(f"duplicate route name {name!r}")
        seen.add(name)
        primary = _upstream_ref(entries["primary"], upstreams)
        shadows: list[str] = []
        if "shadows" in entries:
            for shadow_node in entries["shadows"].elements():
                shadow = _upstream_ref(shadow_node, upstreams)
                if shadow == primary:
                    raise shadow_node.error(
                        f"{shadow!r} is the route's primary; a shadow must differ"
                    )
                if shadow in shadows:
                    raise shadow_node.error(f"duplicate shadow {shadow!r}")
                shadows.append(shadow)
        routes.append(
            RouteSettings(
                name=name,
                match=_match(entries["match"])
                if "match" in entries
                else MatchSettings(path_prefix="/"),
                primary=primary,
                shadows=tuple(shadows),
                sample_rate=entries["sample_rate"].as_float(0, 1)
                if "sample_rate" in entries
                else 1.0,
                mirror=_mirror(entries["mirror"]) if "mirror" in entries else MirrorSettings(),
                compare=_compare(entries["compare"]) if "compare" in entries else CompareSettings(),
                gate=_gate(entries["gate"]) if "gate" in entries else GateSettings(),
            )
        )
    if not routes:
        raise node.error("at least one route is required")
    return tuple(routes)


def _upstream_ref(n: Node, upstreams: dict[str, UpstreamSettings]) -> str:
    name = n.as_str()
    if name not in upstreams:
        known = ", ".join(sorted(upstreams))
        raise n.error(f"unknown upstream {name!r} (defined: {known})")
    return name
