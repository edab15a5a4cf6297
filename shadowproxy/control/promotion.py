"""Promotion as a file operation: swap a route's primary with one of its shadows in routes.yaml.

The file stays byte-identical except the two swapped scalars. ruamel.yaml's round-trip
composer locates them (node marks carry their exact character span and quoting style);
the new values are spliced into the original text, each position keeping its own
quoting, and the result is parsed again and checked to mean exactly the old document
with the two values exchanged. Re-emitting the whole document through ruamel would
keep comments and order but may still re-flow long lines, flow mappings and indents.

The write is atomic (temp file in the same directory, fsync, ``os.replace``) and keeps
the file mode. A symlinked or read-only file is refused rather than replaced: on
Kubernetes the ConfigMap is the source of truth and a local edit would be lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from shadowproxy.base.errors import ConfigError, ShadowProxyError

CONFIGMAP_HINT = "edit the ConfigMap instead"


class RouteNotFound(ShadowProxyError):
    def __init__(self, route: str, path: str, known: tuple[str, ...]) -> None:
        self.route = route
        self.path = path
        self.known = known
        names = ", ".join(known) or "none"
        super().__init__(f"{path}: unknown route {route!r} (routes: {names})")


class ShadowNotFound(ShadowProxyError):
    def __init__(self, route: str, shadow: str | None, path: str, shadows: tuple[str, ...]) -> None:
        self.route = route
        self.shadow = shadow
        self.path = path
        self.shadows = shadows
        if not shadows:
            message = f"{path}: route {route!r} has no shadows to promote"
        else:
            message = (
                f"{path}: route {route!r} has no shadow {shadow!r} "
                f"(its shadows: {', '.join(shadows)})"
            )
        super().__init__(message)


class ConfigNotWritable(ShadowProxyError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, slots=True)
class PromotionResult:
    route: str
    previous_primary: str
    new_primary: str
    old_sha256: str
    new_sha256: str


@dataclass(frozen=True, slots=True)
class RouteView:
    """A route's primary and shadows as they stand in the file (no validation)."""

    name: str
    primary: str
    shadows: tuple[str, ...]


def read_route(path: str, route: str) -> RouteView:
    """The route's primary and shadows as written in ``path``; raises RouteNotFound."""
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    found = _find_route(_compose(text, path), route, path)
    return RouteView(route, found.primary.value, tuple(n.value for n in found.shadows))


def swap_primary(path: str, route: str, shadow: str | None) -> PromotionResult:
    """Make ``shadow`` (default: the route's first) the primary; the old primary takes its place."""
    _check_writable(path)
    with open(path, "rb") as f:
        raw = f.read()
    text = _decode(raw, path)
    found = _find_route(_compose(text, path), route, path)
    names = tuple(n.value for n in found.shadows)
    target = shadow if shadow is not None else (names[0] if names else None)
    if target is None or target not in names:
        raise ShadowNotFound(route, shadow, path, names)
    shadow_node = found.shadows[names.index(target)]
    old_primary = found.primary.value

    edits = sorted(
        [
            (found.primary, _render(text, found.primary, target, path)),
            (shadow_node, _render(text, shadow_node, old_primary, path)),
        ],
        key=lambda edit: edit[0].start_mark.index,
        reverse=True,
    )
    new_text = text
    for node, replacement in edits:
        new_text = new_text[: node.start_mark.index] + replacement + new_text[node.end_mark.index :]
    _verify(text, new_text, route, target, old_primary, path)

    new_raw = new_text.encode("utf-8")
    old_sha = hashlib.sha256(raw).hexdigest()
    _atomic_write(path, new_raw, expected_sha256=old_sha)
    return PromotionResult(
        route=route,
        previous_primary=old_primary,
        new_primary=target,
        old_sha256=old_sha,
        new_sha256=hashlib.sha256(new_raw).hexdigest(),
    )


@dataclass(frozen=True, slots=True)
class _FoundRoute:
    primary: ScalarNode
    shadows: tuple[ScalarNode, ...]


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8: {exc}", path=path) from exc


def _compose(text: str, path: str) -> Node:
    try:
        node = YAML(typ="rt").compose(text)
    except YAMLError as exc:
        line = (
            exc.problem_mark.line + 1
            if isinstance(exc, MarkedYAMLError) and exc.problem_mark
            else None
        )
        raise ConfigError(f"invalid YAML: {exc}", path=path, line=line) from exc
    if not isinstance(node, MappingNode):
        raise ConfigError("expected a mapping at the top level", path=path)
    return node


def _get(mapping: MappingNode, key: str) -> Node | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return value_node  # type: ignore[no-any-return]
    return None


def _find_route(root: Node, route: str, path: str) -> _FoundRoute:
    assert isinstance(root, MappingNode)
    routes = _get(root, "routes")
    if not isinstance(routes, SequenceNode):
        raise ConfigError("expected a list", path=path, key="routes")
    known: list[str] = []
    for index, item in enumerate(routes.value):
        if not isinstance(item, MappingNode):
            continue
        name = _get(item, "name")
        if not isinstance(name, ScalarNode):
            continue
        known.append(name.value)
        if name.value != route:
            continue
        where = f"routes[{index}]"
        primary = _get(item, "primary")
        if not isinstance(primary, ScalarNode):
            raise ConfigError("expected an upstream name", path=path, key=f"{where}.primary")
        shadows = _get(item, "shadows")
        if shadows is None:
            return _FoundRoute(primary, ())
        if isinstance(shadows, ScalarNode):
            return _FoundRoute(primary, (shadows,))
        if isinstance(shadows, SequenceNode) and all(
            isinstance(s, ScalarNode) for s in shadows.value
        ):
            return _FoundRoute(primary, tuple(shadows.value))
        raise ConfigError("expected a list of upstream names", path=path, key=f"{where}.shadows")
    raise RouteNotFound(route, path, tuple(known))


def _render(text: str, node: ScalarNode, value: str, path: str) -> str:
    """``value`` written the way ``node`` is written: plain, 'single' or "double" quoted."""
    span = text[node.start_mark.index : node.end_mark.index]
    if node.style is None:
        as_written = span == node.value
    elif node.style in ("'", '"'):
        as_written = span.startswith(node.style)
    else:
        as_written = False  # block scalar
    if not as_written:
        raise ConfigError(
            f"{node.value!r} is written with a YAML anchor, tag or block style; "
            "promote by editing the file",
            path=path,
            line=node.start_mark.line + 1,
        )
    if node.style == "'" and "\n" not in value:
        return "'" + value.replace("'", "''") + "'"
    if node.style is None and _plain_safe(value):
        return value
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _plain_safe(value: str) -> bool:
    """True when ``value`` reads back as the same string, unquoted, in block and flow context."""
    if not value or value != value.strip():
        return False
    loader = YAML(typ="safe", pure=True)
    try:
        return bool(
            loader.load(f"k: {value}\n") == {"k": value} and loader.load(f"[{value}]") == [value]
        )
    except YAMLError:
        return False


def _verify(
    old_text: str, new_text: str, route: str, new_primary: str, old_primary: str, path: str
) -> None:
    """The edited text must mean the old document with exactly the two values exchanged."""
    loader = YAML(typ="safe", pure=True)
    expected = _unshare(loader.load(old_text))  # an alias must not carry the edit elsewhere
    for item in expected["routes"]:
        if isinstance(item, dict) and item.get("name") == route:
            item["primary"] = new_primary
            shadows = item["shadows"]
            if isinstance(shadows, list):
                shadows[shadows.index(new_primary)] = old_primary
            else:
                item["shadows"] = old_primary
            break
    try:
        actual = loader.load(new_text)
    except YAMLError:
        actual = None
    if actual != expected:
        raise ConfigError(
            f"cannot swap route {route!r} in place (YAML anchors or aliases?); "
            "promote by editing the file",
            path=path,
        )


def _unshare(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _unshare(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_unshare(value) for value in data]
    return data


def _check_writable(path: str) -> None:
    if os.path.islink(path):
        raise ConfigNotWritable(
            path,
            f"is a symlink (a Kubernetes ConfigMap mount?), not replaced; {CONFIGMAP_HINT}",
        )
    mode = os.stat(path).st_mode
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigNotWritable(path, f"is read-only (mode {stat.S_IMODE(mode):04o})")


def _atomic_write(path: str, data: bytes, *, expected_sha256: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
    except OSError as exc:
        raise _not_writable(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        with open(path, "rb") as current:
            if hashlib.sha256(current.read()).hexdigest() != expected_sha256:
                raise ConfigError("changed by someone else while promoting; retry", path=path)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _not_writable(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _not_writable(path: str, exc: OSError) -> ConfigNotWritable:
    if exc.errno in (errno.EROFS, errno.EBUSY, errno.EXDEV):
        return ConfigNotWritable(
            path, f"is on a read-only or mounted file system ({exc.strerror}); {CONFIGMAP_HINT}"
        )
    return ConfigNotWritable(path, f"cannot be replaced: {exc.strerror or exc}")


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; some file systems refuse fsync on a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
