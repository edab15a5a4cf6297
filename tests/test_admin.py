from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pytest_aiohttp.plugin import AiohttpClient

from shadowproxy.base.errors import ConfigError
from shadowproxy.control.admin import build_admin_app
from shadowproxy.control.promotion import ConfigNotWritable, RouteNotFound, ShadowNotFound

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeControl:
    """A ControlPlane whose answers and failures the test sets."""

    def __init__(self) -> None:
        self.is_ready = True
        self.fail_with: Exception | None = None
        self.calls: list[tuple[Any, ...]] = []

    def status(self) -> dict[str, Any]:
        return {"config": {"path": "routes.yaml", "sha256": "abc"}, "routes": []}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return self.is_ready, {"config_loaded": True, "storage": "ok" if self.is_ready else "down"}

    async def reload(self) -> dict[str, Any]:
        self.calls.append(("reload",))
        if self.fail_with is not None:
            raise self.fail_with
        return {"changed": True, "sha256": "def"}

    async def promote(self, route: str, shadow: str | None) -> dict[str, Any]:
        self.calls.append(("promote", route, shadow))
        if self.fail_with is not None:
            raise self.fail_with
        return {"route": route, "previous_primary": "v1", "new_primary": shadow or "v2"}


def metrics_text_for(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


async def make_client(
    aiohttp_client: AiohttpClient, control: FakeControl, token: str | None = TOKEN
) -> TestClient[web.Request, web.Application]:
    registry = CollectorRegistry()
    Counter("shadowproxy_promotions_total", "Promotions.", ["route"], registry=registry).labels(
        route="sentiment"
    ).inc()
    app = build_admin_app(
        control,
        token=token,
        token_env="SHADOWPROXY_ADMIN_TOKEN",
        metrics_text=lambda: metrics_text_for(registry),
    )
    return await aiohttp_client(app)


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, control: FakeControl
) -> TestClient[web.Request, web.Application]:
    return await make_client(aiohttp_client, control)


ADMIN_ENDPOINTS = [
    ("GET", "/admin/status"),
    ("POST", "/admin/reload"),
    ("POST", "/admin/promote?route=sentiment"),
]


# --- authentication ---------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token!",  # same length
        f"Bearer {TOKEN}x",  # longer
        f"Bearer {TOKEN[:-1]}",  # shorter, a prefix
        "Bearer " + "x" * 4_000,
        TOKEN,  # no scheme
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        f"Bearer{TOKEN}",
        f"Bearer {TOKEN} extra",
    ],
)
async def test_refused_with_401(
    client: TestClient[web.Request, web.Application],
    control: FakeControl,
    method: str,
    path: str,
    authorization: str | None,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await client.request(method, path, headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error" in await resp.json()
    assert control.calls == []


@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER   {TOKEN}  "],
)
async def test_accepted_with_the_token(
    client: TestClient[web.Request, web.Application], method: str, path: str, authorization: str
) -> None:
    resp = await client.request(method, path, headers={"Authorization": authorization})
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("value", ["Bearer tökén-ñ", "Bearer 令牌", f"Bearer {TOKEN}\u00e9"])
async def test_non_ascii_token_is_401_not_500(
    client: TestClient[web.Request, web.Application], value: str
) -> None:
    # Sent as raw UTF-8 bytes: the client would refuse to encode them itself.
    resp = await raw_request(client, "GET", "/admin/status", value.encode("utf-8"))
    assert resp.startswith(b"HTTP/1.1 401"), resp[:200]


async def test_undecodable_header_bytes_are_401_not_500(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await raw_request(client, "GET", "/admin/status", b"Bearer \xff\xfe" + TOKEN.encode())
    assert resp.startswith(b"HTTP/1.1 401"), resp[:200]


async def raw_request(
    client: TestClient[web.Request, web.Application],
    method: str,
    path: str,
    authorization: bytes,
) -> bytes:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n".encode()
        + b"Authorization: "
        + authorization
        + b"\r\n\r\n"
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    await writer.wait_closed()
    return data


@pytest.mark.parametrize("token", [None, "", "   "])
@pytest.mark.parametrize(("method", "path"), ADMIN_ENDPOINTS)
async def test_no_token_configured_is_403_saying_how_to_enable(
    aiohttp_client: AiohttpClient,
    control: FakeControl,
    token: str | None,
    method: str,
    path: str,
) -> None:
    client = await make_client(aiohttp_client, control, token=token)
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
        resp = await client.request(method, path, headers=headers)
        assert resp.status == 403
        body = await resp.json()
        assert body["enable"] == "set $SHADOWPROXY_ADMIN_TOKEN to a secret and restart"
    assert control.calls == []


async def test_configured_token_with_trailing_newline_still_works(
    aiohttp_client: AiohttpClient, control: FakeControl
) -> None:
    client = await make_client(aiohttp_client, control, token=TOKEN + "\n")
    assert (await client.get("/admin/status", headers=AUTH)).status == 200


# --- open endpoints --------------------------------------------------------------


async def test_probes_and_metrics_need_no_token(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}

    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert 'shadowproxy_promotions_total{route="sentiment"} 1.0' in await resp.text()


async def test_readyz_200_and_503_with_details(
    client: TestClient[web.Request, web.Application], control: FakeControl
) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"ready": True, "config_loaded": True, "storage": "ok"}
    control.is_ready = False
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"ready": False, "config_loaded": True, "storage": "down"}


async def test_status(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/admin/status", headers=AUTH)
    assert resp.content_type == "application/json"
    assert (await resp.json())["config"]["sha256"] == "abc"


async def test_unknown_path_and_wrong_method_answer_json(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404
    assert "error" in await resp.json()
    resp = await client.get("/admin/reload", headers=AUTH)
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]
    assert "error" in await resp.json()


# --- reload and promote ------------------------------------------------------------


async def test_reload_ok_and_invalid(
    client: TestClient[web.Request, web.Application], control: FakeControl
) -> None:
    resp = await client.post("/admin/reload", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"changed": True, "sha256": "def"}

    control.fail_with = ConfigError("expected a number", path="routes.yaml", line=12, key="x")
    resp = await client.post("/admin/reload", headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"] == "routes.yaml:12: x: expected a number"


async def test_promote_passes_route_and_shadow(
    client: TestClient[web.Request, web.Application], control: FakeControl
) -> None:
    resp = await client.post("/admin/promote?route=sentiment&shadow=v3", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["new_primary"] == "v3"
    resp = await client.post("/admin/promote?route=sentiment&shadow=", headers=AUTH)
    assert resp.status == 200
    assert control.calls == [("promote", "sentiment", "v3"), ("promote", "sentiment", None)]


@pytest.mark.parametrize("query", ["", "?route=", "?route=%20", "?shadow=v2"])
async def test_promote_without_route_is_400(
    client: TestClient[web.Request, web.Application], control: FakeControl, query: str
) -> None:
    resp = await client.post(f"/admin/promote{query}", headers=AUTH)
    assert resp.status == 400
    assert "route" in (await resp.json())["error"]
    assert control.calls == []


@pytest.mark.parametrize(
    ("error", "status", "text"),
    [
        (RouteNotFound("nope", "routes.yaml", ("sentiment",)), 404, "unknown route 'nope'"),
        (ShadowNotFound("sentiment", "v9", "routes.yaml", ("v2", "v3")), 404, "v2, v3"),
        (ConfigNotWritable("routes.yaml", "is a symlink; edit the ConfigMap instead"), 409,
         "edit the ConfigMap instead"),
        (ConfigError("unknown upstream 'v9'", path="routes.yaml", line=3), 400,
         "routes.yaml:3: unknown upstream 'v9'"),
        (RuntimeError("boom"), 500, "internal error"),
    ],
)  # fmt: skip
async def test_promote_errors_map_to_status(
    client: TestClient[web.Request, web.Application],
    control: FakeControl,
    error: Exception,
    status: int,
    text: str,
) -> None:
    control.fail_with = error
    resp = await client.post("/admin/promote?route=sentiment", headers=AUTH)
    assert resp.status == status
    assert text in (await resp.json())["error"]
