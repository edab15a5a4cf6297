"""`shadowproxy promote ROUTE [--shadow S] [--admin-url URL] [--if-ready]`.

With ``--admin-url`` the running proxy does the work (``POST /admin/promote``; the
token comes from the environment variable the config's ``admin.token_env`` names).
Without it the file is edited here, then the admin listener named in the config is
asked to reload; when none answers, running proxies pick the change up through the
file watcher or SIGHUP. ``--if-ready`` promotes only when the report's gate says ready.

Exit codes as in base/exits.py: 0 promoted; 1 gate not passed; 2 anything refused or
unreachable (the message says what and where); 3 too few samples. Nothing is promoted
unless the exit code is 0.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Protocol
from urllib.parse import urlencode

from ruamel.yaml import YAML

from shadowproxy.base.errors import ShadowProxyError
from shadowproxy.base.exits import EXIT_INSUFFICIENT, EXIT_NOT_READY, EXIT_OK, EXIT_USAGE
from shadowproxy.config.settings import AdminSettings
from shadowproxy.control.promotion import read_route, swap_primary

ADMIN_TIMEOUT_S = 30.0  # a promotion includes a reload
RELOAD_TIMEOUT_S = 2.0  # just a nudge: the watcher or SIGHUP cover a silent listener


class Gate(Protocol):
    def __call__(
        self,
        *,
        config_path: str,
        database_url: str | None,
        route: str,
        shadow: str | None,
        since: str,
    ) -> int: ...


def promote_command(
    *,
    route: str,
    shadow: str | None,
    config_path: str,
    admin_url: str | None,
    if_ready: bool,
    database_url: str | None,
    since: str,
    gate: Gate | None = None,
) -> int:
    if if_ready:
        code = _check_gate(gate, config_path, database_url, route, shadow, since, admin_url)
        if code != EXIT_OK:
            return code
    if admin_url:
        return _promote_through_admin(admin_url, route, shadow, config_path)
    return _promote_file(config_path, route, shadow)


def _fail(message: str) -> int:
    print(f"shadowproxy promote: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_gate(
    gate: Gate | None,
    config_path: str,
    database_url: str | None,
    route: str,
    shadow: str | None,
    since: str,
    admin_url: str | None,
) -> int:
    if shadow is None:
        # Gate exactly the shadow that would be promoted: the route's first.
        try:
            shadows = read_route(config_path, route).shadows
            shadow = shadows[0] if shadows else None
        except (OSError, ShadowProxyError) as exc:
            if not admin_url:  # the file is the thing to edit: it must be readable
                return _fail(str(exc) if isinstance(exc, ShadowProxyError) else _os_error(exc))
    code = (gate or _evaluate_gate)(
        config_path=config_path, database_url=database_url, route=route, shadow=shadow, since=since
    )
    what = f"route {route!r}" + (f" shadow {shadow!r}" if shadow else "")
    if code == EXIT_NOT_READY:
        print(
            f"shadowproxy promote: {what} did not pass the gate; nothing promoted", file=sys.stderr
        )
    elif code == EXIT_INSUFFICIENT:
        print(
            f"shadowproxy promote: {what}: too few samples to decide; nothing promoted",
            file=sys.stderr,
        )
    elif code != EXIT_OK:
        print(
            f"shadowproxy promote: gate check failed (exit {code}); nothing promoted",
            file=sys.stderr,
        )
    return code


def _evaluate_gate(
    *, config_path: str, database_url: str | None, route: str, shadow: str | None, since: str
) -> int:
    from shadowproxy.commands.report import evaluate_gate

    code: int = evaluate_gate(
        config_path=config_path, database_url=database_url, route=route, shadow=shadow, since=since
    )
    return code


def _promote_file(config_path: str, route: str, shadow: str | None) -> int:
    try:
        result = swap_primary(config_path, route, shadow)
    except ShadowProxyError as exc:  # unknown route or shadow, not writable, invalid YAML
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_error(exc))
    print(
        f"{config_path}: route {route!r}: {result.new_primary!r} is now the primary, "
        f"{result.previous_primary!r} a shadow (sha256 {result.new_sha256})"
    )
    return _ask_to_reload(config_path)


def _ask_to_reload(config_path: str) -> int:
    admin = admin_settings(config_path)
    url = f"http://{_loopback(admin.host)}:{admin.port}/admin/reload"
    fallback = "running proxies pick the change up through the file watcher or SIGHUP"
    token = os.environ.get(admin.token_env, "").strip()
    if not token:
        print(f"${admin.token_env} is not set, so {url} was not asked to reload; {fallback}")
        return EXIT_OK
    try:
        status, payload = _post(url, token, RELOAD_TIMEOUT_S)
    except _Unreachable as exc:
        print(f"no admin listener answered at {url} ({exc}); {fallback}")
        return EXIT_OK
    if status == 200:
        print(f"the proxy at {url} reloaded")
        return EXIT_OK
    if status == 400:
        return _fail(
            f"{config_path} was changed but the proxy rejected it: {_error(payload)}; "
            "it keeps serving the previous routes"
        )
    print(f"the admin listener at {url} answered {status} ({_error(payload)}); {fallback}")
    return EXIT_OK


def _promote_through_admin(admin_url: str, route: str, shadow: str | None, config_path: str) -> int:
    token_env = admin_settings(config_path).token_env
    token = os.environ.get(token_env, "").strip()
    if not token:
        return _fail(f"set ${token_env} to the proxy's admin token")
    query = {"route": route, **({"shadow": shadow} if shadow else {})}
    url = f"{admin_url.rstrip('/')}/admin/promote?{urlencode(query)}"
    try:
        status, payload = _post(url, token, ADMIN_TIMEOUT_S)
    except _Unreachable as exc:
        return _fail(f"cannot reach the admin endpoint {admin_url}: {exc}")
    if status == 200:
        new = payload.get("new_primary", "?") if isinstance(payload, dict) else "?"
        previous = payload.get("previous_primary", "?") if isinstance(payload, dict) else "?"
        print(f"{admin_url}: route {route!r}: {new!r} is now the primary, {previous!r} a shadow")
        return EXIT_OK
    if status == 401:
        return _fail(f"{admin_url} refused the token in ${token_env} (401)")
    if status == 403:
        return _fail(f"{admin_url} has its admin endpoints disabled (403): {_error(payload)}")
    return _fail(f"{admin_url} answered {status}: {_error(payload)}")


def admin_settings(config_path: str) -> AdminSettings:
    """The config's ``admin`` section, read leniently: defaults for whatever is unreadable."""
    defaults = AdminSettings()
    try:
        with open(config_path, "rb") as f:
            doc = YAML(typ="safe", pure=True).load(f)
        admin = doc.get("admin") or {}
        return AdminSettings(
            host=str(admin.get("host") or defaults.host),
            port=int(admin.get("port") or defaults.port),
            token_env=str(admin.get("token_env") or defaults.token_env),
        )
    except Exception:  # unreadable or invalid: the defaults are the best guess
        return defaults


def _loopback(host: str) -> str:
    """Where to reach a listener bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _Unreachable(Exception):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the bearer token elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# Admin listeners are internal: no $http_proxy, no redirects.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _post(url: str, token: str, timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with _opener.open(request, timeout=timeout) as response:
            status, body = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise _Unreachable(str(reason)) from exc
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def _error(payload: Any) -> str:
    if isinstance(payload, dict):
        parts = [str(payload[k]) for k in ("error", "enable") if payload.get(k)]
        return "; ".join(parts) or json.dumps(payload)
    return str(payload)[:500]


def _os_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file"
    return f"{exc.filename or ''}: {exc.strerror or exc}"
