"""The request path against real in-process upstreams: forwarding, routing, errors, streaming."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs
from yarl import URL

from tests.proxyharness import free_port, running_service, sample, write_config
from tests.waiting import until as wait_until


def echo_app(name: str = "primary", seen: list[dict[str, Any]] | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        info = {
            "upstream": name,
            "method": request.method,
            "path": request.raw_path,
            "headers": list(request.headers.items()),
            "body": body.decode("latin-1"),
        }
        if seen is not None:
            seen.append(info)
        return web.json_response(
            info, headers={"X-Upstream": name, "Connection": "keep-alive, X-Hop", "X-Hop": "1"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_forwarding_preserves_request_and_sets_proxy_headers(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    primary = await serve(echo_app(seen=seen))
    primary_host = url(primary).removeprefix("http://")
    config = write_config(tmp_path, {"p": url(primary)}, [{"name": "all", "primary": "p"}])
    async with (
        running_service(config) as service,
        aiohttp.ClientSession(skip_auto_headers=("Accept-Encoding",)) as client,
    ):
        async with client.post(
            URL(f"http://127.0.0.1:{service.proxy_port}/predict/x?b=2&a=1&a=%2F", encoded=True),
            data=b'{"x": [1, 2]}',
            headers={
                "Content-Type": "application/json",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Private",
                "X-Private": "hop",
                "Keep-Alive": "timeout=5",
                "X-Request-ID": "req-123",
                "Host": "proxy.example",
            },
        ) as response:
            assert response.status == 200
            assert response.headers["X-Request-ID"] == "req-123"
            assert response.headers["X-Upstream"] == "primary"
            assert "X-Hop" not in response.headers
            got = await response.json()
    await primary.close()
    headers = {k.lower(): v for k, v in got["headers"]}
    assert got["method"] == "POST"
    assert got["path"] == "/predict/x?b=2&a=1&a=%2F"
    assert got["body"] == '{"x": [1, 2]}'
    assert headers["x-custom"] == "kept"
    assert headers["content-type"] == "application/json"
    assert "x-private" not in headers and "keep-alive" not in headers
    assert headers["x-request-id"] == "req-123"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "proxy.example"
    assert headers["host"] == primary_host
    assert "accept-encoding" not in headers  # nothing added on the client's behalf


async def test_request_id_generated_when_absent(tmp_path: Path) -> None:
    primary = await serve(echo_app())
    config = write_config(tmp_path, {"p": url(primary)}, [{"name": "all", "primary": "p"}])
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{service.proxy_port}/x") as response:
            rid = response.headers["X-Request-ID"]
            got = await response.json()
    await primary.close()
    assert len(rid) == 32
    assert dict((k.lower(), v) for k, v in got["headers"])["x-request-id"] == rid


async def test_routing_first_match_wins_and_404(tmp_path: Path) -> None:
    a, b, c = await serve(echo_app("a")), await serve(echo_app("b")), await serve(echo_app("c"))
    routes = [
        {"name": "exact", "match": {"path": "/v1/exact", "methods": ["POST"]}, "primary": "a"},
        {
            "name": "hosted",
            "match": {"path_prefix": "/v1", "host": "models.example"},
            "primary": "c",
        },
        {"name": "prefix", "match": {"path_prefix": "/v1"}, "primary": "b"},
    ]
    config = write_config(tmp_path, {"a": url(a), "b": url(b), "c": url(c)}, routes)
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{service.proxy_port}"

        async def who(method: str, path: str, **kw: Any) -> str:
            async with client.request(method, base + path, **kw) as r:
                if r.status != 200:
                    return str(r.status)
                return str((await r.json())["upstream"])

        assert await who("POST", "/v1/exact") == "a"
        assert await who("GET", "/v1/exact") == "b"  # method does not match the first route
        assert await who("POST", "/v1/exact/more") == "b"  # exact path only
        assert await who("GET", "/v1/other", headers={"Host": "models.example:8080"}) == "c"
        assert await who("GET", "/v1") == "b"
        assert await who("GET", "/v10") == "404"  # a prefix matches whole segments
        async with client.get(base + "/nothing", headers={"X-Request-ID": "r404"}) as r:
            assert r.status == 404
            body = await r.json()
            assert body == {"error": "no route matches GET /nothing", "request_id": "r404"}
    for s in (a, b, c):
        await s.close()


async def test_primary_unreachable_502_timeout_504_too_large_413(tmp_path: Path) -> None:
    hang = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await hang.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    slow_server = await serve(app)
    upstreams = {
        "down": f"http://127.0.0.1:{free_port()}",
        "slow": {"url": url(slow_server), "timeout_ms": 200},
    }
    routes = [
        {"name": "down", "match": {"path_prefix": "/down"}, "primary": "down"},
        {"name": "slow", "match": {"path_prefix": "/slow"}, "primary": "slow"},
    ]
    config = write_config(tmp_path, upstreams, routes, server={"max_body_bytes": 1000})
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{service.proxy_port}"
        async with client.get(base + "/down") as r:
            assert r.status == 502
            body = await r.json()
            assert body["error"].startswith("primary upstream down: connect")
            assert body["request_id"] == r.headers["X-Request-ID"]
        async with client.get(base + "/slow") as r:
            assert r.status == 504
            assert (await r.json())["error"] == "primary upstream slow: timeout"
        async with client.post(base + "/down", data=b"x" * 1001) as r:
            assert r.status == 413
            assert "1000 bytes" in (await r.json())["error"]
    hang.set()
    await slow_server.close()


async def test_chunked_and_event_stream_pass_through_incrementally(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": request.query.get("ct", "text/plain")}
        )
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()  # the client must see the first event before we go on
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    upstream = await serve(app)
    config = write_config(
        tmp_path, {"p": url(upstream)}, [{"name": "all", "primary": "p", "shadows": []}]
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        for content_type in ("text/event-stream", "text/plain"):
            release.clear()
            async with client.get(
                f"http://127.0.0.1:{service.proxy_port}/stream?ct={content_type}"
            ) as r:
                assert r.headers["Content-Type"].startswith(content_type)
                assert r.headers.get("Transfer-Encoding") == "chunked"
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
                assert first == b"data: first\n\n"
                release.set()
                assert await r.content.read() == b"data: second\n\n"
    await upstream.close()


async def test_multiple_set_cookie_and_status_pass_through(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(
            status=418, body=b"\x00\x01binary", content_type="application/octet-stream"
        )
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    upstream = await serve(app)
    config = write_config(tmp_path, {"p": url(upstream)}, [{"name": "all", "primary": "p"}])
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        async with client.get(f"http://127.0.0.1:{service.proxy_port}/") as r:
            assert r.status == 418
            assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert await r.read() == b"\x00\x01binary"
    await upstream.close()


@pytest.mark.parametrize(
    "target", ["http://169.254.169.254/latest", "//evil.example/x", "/..%2f..%2fetc", "/@evil"]
)
async def test_request_target_never_changes_the_upstream(tmp_path: Path, target: str) -> None:
    seen: list[dict[str, Any]] = []
    primary = await serve(echo_app(seen=seen))
    config = write_config(tmp_path, {"p": url(primary)}, [{"name": "all", "primary": "p"}])
    async with running_service(config) as service:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.proxy_port)
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    await primary.close()
    status = int(raw.split(b" ", 2)[1])
    if target.startswith("/") and ".." not in target:
        assert status == 200
        assert seen and seen[0]["path"] == target  # forwarded as a path, to the configured upstream
    else:  # not an origin-form path, or dot-segments an upstream would resolve (issue 13)
        assert status == 400
        assert seen == []
    body = orjson.loads(raw.split(b"\r\n\r\n", 1)[1]) if status == 400 else None
    assert body is None or "error" in body


async def test_mirror_gets_same_request_plus_marker(tmp_path: Path) -> None:
    primary_seen: list[dict[str, Any]] = []
    shadow_seen: list[dict[str, Any]] = []
    primary = await serve(echo_app("p", primary_seen))
    shadow = await serve(echo_app("s", shadow_seen))
    config = write_config(
        tmp_path,
        {"p": url(primary), "s": url(shadow)},
        [{"name": "r", "primary": "p", "shadows": ["s"]}],
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        async with client.put(
            # percent-encoding is part of what is mirrored and recorded, byte for byte
            URL(f"http://127.0.0.1:{service.proxy_port}/m%20x?q=%201", encoded=True),
            data=b"payload",
            headers={"X-Request-ID": "mirror-1"},
        ) as r:
            assert (await r.json())["upstream"] == "p"
        await wait_until(lambda: len(shadow_seen) == 1)
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 1
        )
    await primary.close()
    await shadow.close()
    p, s = primary_seen[0], shadow_seen[0]
    assert p["path"] == "/m%20x?q=%201"
    assert (s["method"], s["path"], s["body"]) == ("PUT", "/m%20x?q=%201", "payload")
    (record,) = [
        orjson.loads(line)
        for f in (tmp_path / "records").glob("*.jsonl")
        for line in f.read_bytes().splitlines()
    ]
    assert (record["path"], record["query"]) == ("/m%20x", "q=%201")
    p_headers = {k.lower(): v for k, v in p["headers"] if k.lower() != "host"}
    s_headers = {k.lower(): v for k, v in s["headers"] if k.lower() != "host"}
    assert s_headers.pop("x-shadow-request") == "1"
    assert s_headers == p_headers
    assert s_headers["x-request-id"] == "mirror-1"


async def test_sample_rate_zero_and_body_limit_and_saturation_are_counted(tmp_path: Path) -> None:
    hang = asyncio.Event()
    shadow_calls = 0

    async def hanging(request: web.Request) -> web.Response:
        nonlocal shadow_calls
        shadow_calls += 1
        await hang.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hanging)
    shadow = await serve(app)
    primary = await serve(echo_app())
    upstreams = {"p": url(primary), "s": {"url": url(shadow), "timeout_ms": 30000}}
    routes = [
        {
            "name": "never",
            "match": {"path_prefix": "/never"},
            "primary": "p",
            "shadows": ["s"],
            "sample_rate": 0.0,
        },
        {
            "name": "small",
            "match": {"path_prefix": "/small"},
            "primary": "p",
            "shadows": ["s"],
            "mirror": {"max_body_bytes": 10, "max_in_flight": 2},
        },
    ]
    config = write_config(tmp_path, upstreams, routes)
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{service.proxy_port}"
        for _ in range(3):
            async with client.post(base + "/never", data=b"x") as r:
                assert r.status == 200
        async with client.post(base + "/small", data=b"x" * 11) as r:
            assert r.status == 200
        assert (
            sample(
                service,
                "shadowproxy_mirror_dropped_total",
                route="small",
                shadow="s",
                reason="body_too_large",
            )
            == 1
        )
        for _ in range(5):
            async with client.post(base + "/small", data=b"x") as r:
                assert r.status == 200  # answered while both mirror slots hang
        await wait_until(lambda: shadow_calls == 2)
        assert (
            sample(
                service,
                "shadowproxy_mirror_dropped_total",
                route="small",
                shadow="s",
                reason="saturated",
            )
            == 3
        )
        assert sample(service, "shadowproxy_mirror_in_flight", route="small", shadow="s") == 2
        assert service.dispatcher.in_flight[("small", "s")] == 2
        assert service.dispatcher.take_drop_summary() == {
            "small/s/body_too_large": 1,
            "small/s/saturated": 3,
        }
        assert service.dispatcher.take_drop_summary() == {}  # one log line per burst, then reset
        hang.set()
        await wait_until(lambda: service.dispatcher.in_flight[("small", "s")] == 0)
    await primary.close()
    await shadow.close()


@pytest.mark.parametrize("enabled", [False, True])
async def test_access_log_is_opt_in(tmp_path: Path, enabled: bool) -> None:
    primary = await serve(echo_app())
    config = write_config(
        tmp_path,
        {"p": url(primary)},
        [{"name": "all", "primary": "p"}],
        server={"access_log": enabled},
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        with capture_logs() as logs:
            for _ in range(3):
                async with client.get(
                    f"http://127.0.0.1:{service.proxy_port}/a?b=c", headers={"X-Request-ID": "acc"}
                ) as r:
                    assert r.status == 200
    await primary.close()
    requests = [entry for entry in logs if entry["event"] == "request"]
    if not enabled:
        assert requests == []  # nothing per request by default
    else:
        assert len(requests) == 3
        assert requests[0]["method"] == "GET" and requests[0]["path"] == "/a"
        assert requests[0]["status"] == 200 and requests[0]["request_id"] == "acc"
