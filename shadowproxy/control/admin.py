"""The admin listener: metrics and probes open, ``/admin/*`` behind a bearer token.

The token is compared as sha256 digests with ``hmac.compare_digest``: constant time,
no length leak, and nothing a client sends (non-ASCII, odd schemes) can raise. Without
a configured token the ``/admin/*`` endpoints answer 403 and say how to enable them.
Every body, errors included, is JSON (``/metrics`` aside).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
import structlog
from aiohttp import hdrs, web

from shadowproxy.base.errors import ConfigError
from shadowproxy.control.plane import ControlPlane
from shadowproxy.control.promotion import ConfigNotWritable, RouteNotFound, ShadowNotFound

log = structlog.get_logger("shadowproxy.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="shadowproxy-admin"'}


def json_response(
    payload: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload, default=str),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _digest(value: str) -> bytes | None:
    try:
        return hashlib.sha256(value.encode("utf-8")).digest()
    except UnicodeEncodeError:  # lone surrogates from undecodable header bytes
        return None


class _Admin:
    def __init__(
        self,
        control: ControlPlane,
        token: str | None,
        token_env: str,
        metrics_text: Callable[[], tuple[bytes, str]],
    ) -> None:
        self.control = control
        self.token_env = token_env
        self.metrics_text = metrics_text
        # Header values cannot carry surrounding whitespace, so neither can a usable token
        # (a secret file's trailing newline would otherwise lock everyone out).
        stripped = (token or "").strip()
        self.expected = _digest(stripped) if stripped else None

    def guarded(self, handler: Handler) -> Handler:
        async def check_token(request: web.Request) -> web.StreamResponse:
            refusal = self.refusal(request)
            return refusal if refusal is not None else await handler(request)

        return check_token

    def refusal(self, request: web.Request) -> web.Response | None:
        if self.expected is None:
            return json_response(
                {
                    "error": "admin endpoints are disabled: no admin token is configured",
                    "enable": f"set ${self.token_env} to a secret and restart",
                },
                status=403,
            )
        scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        given = _digest(credentials.strip()) if scheme.lower() == "bearer" else None
        if given is not None and hmac.compare_digest(given, self.expected):
            return None
        log.warning("admin_unauthorized", path=request.path, remote=request.remote)
        return json_response(
            {"error": "unauthorized: send Authorization: Bearer <token>"},
            status=401,
            headers=UNAUTHORIZED_HEADERS,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics_text()
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ok, details = self.control.ready()
        return json_response({**details, "ready": ok}, status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        return json_response(self.control.status())

    async def reload(self, request: web.Request) -> web.Response:
        try:
            return json_response(await self.control.reload())
        except ConfigError as exc:
            return json_response({"error": str(exc)}, status=400)

    async def promote(self, request: web.Request) -> web.Response:
        route = request.query.get("route", "").strip()
        if not route:
            return json_response(
                {"error": "missing query parameter 'route': /admin/promote?route=R[&shadow=S]"},
                status=400,
            )
        shadow = request.query.get("shadow", "").strip() or None
        try:
            return json_response(await self.control.promote(route, shadow))
        except RouteNotFound as exc:
            return json_response({"error": str(exc), "route": route}, status=404)
        except ShadowNotFound as exc:
            return json_response(
                {"error": str(exc), "route": route, "shadows": list(exc.shadows)}, status=404
            )
        except ConfigNotWritable as exc:
            return json_response({"error": str(exc), "path": exc.path}, status=409)
        except ConfigError as exc:
            return json_response({"error": str(exc)}, status=400)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {
            k: v
            for k, v in exc.headers.items()
            if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)
        }
        return json_response({"error": exc.reason}, status=exc.status, headers=headers)
    except Exception as exc:
        log.exception("admin_request_failed", path=request.path, error=repr(exc))
        return json_response({"error": "internal error, see the proxy's log"}, status=500)


def build_admin_app(
    control: ControlPlane,
    *,
    token: str | None,
    token_env: str,
    metrics_text: Callable[[], tuple[bytes, str]],
) -> web.Application:
    admin = _Admin(control, token, token_env, metrics_text)
    app = web.Application(middlewares=[_json_errors])
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/admin/status", admin.guarded(admin.status))
    app.router.add_post("/admin/reload", admin.guarded(admin.reload))
    app.router.add_post("/admin/promote", admin.guarded(admin.promote))
    return app
