"""The well-behaved fake model the end-to-end tests put behind the proxy."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


async def fake_model(
    answer: dict[str, Any],
    *,
    hold: asyncio.Event | None = None,
    arrived: asyncio.Event | None = None,
) -> TestServer:
    """A started model server on loopback: any method and path, body read, ``answer`` as JSON.

    With ``hold``, requests to ``/slow`` set ``arrived`` (if given) and wait for ``hold``.
    Close it with ``await server.close()``.
    """

    async def predict(request: web.Request) -> web.Response:
        await request.read()
        if hold is not None and request.path == "/slow":
            if arrived is not None:
                arrived.set()
            await hold.wait()
        return web.json_response(answer)

    app = web.Application()
    app.router.add_route("*", "/{tail:[\\s\\S]*}", predict)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server
