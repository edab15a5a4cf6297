from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp.plugin import AiohttpServer

from shadowproxy.commands.promote import admin_settings, promote_command

TOKEN_ENV = "SHADOWPROXY_TEST_PROMOTE_TOKEN"
TOKEN = "t0ken-for-tests"


def routes_yaml(admin_port: int, token_env: str = TOKEN_ENV, host: str = "0.0.0.0") -> str:
    return f"""\
# production routes
admin: {{host: {host}, port: {admin_port}, token_env: {token_env}}}
upstreams:
  v1: {{url: http://127.0.0.1:9001}}
  v2: {{url: http://127.0.0.1:9002}}
  v3: {{url: http://127.0.0.1:9003}}
routes:
  - name: sentiment
    primary: v1   # in production
    shadows: [v2, v3]
"""


def port_of(server: TestServer) -> int:
    assert server.port is not None
    return server.port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeAdmin:
    """Stands in for the proxy's admin listener: checks the token, records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], str | None]] = []
        self.answer: tuple[int, dict[str, Any]] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/admin/promote", self.handle)
        app.router.add_post("/admin/reload", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append((request.path, dict(request.query), request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.answer is not None:
            status, body = self.answer
            return web.json_response(body, status=status)
        if request.path == "/admin/reload":
            return web.json_response({"reloaded": True})
        shadow = request.query.get("shadow", "v2")
        return web.json_response(
            {"route": request.query["route"], "previous_primary": "v1", "new_primary": shadow}
        )


@pytest.fixture
def fake() -> FakeAdmin:
    return FakeAdmin()


@pytest.fixture
async def server(aiohttp_server: AiohttpServer, fake: FakeAdmin) -> TestServer:
    return await aiohttp_server(fake.app())


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


async def promote(config: Path | str, admin_url: str | None = None, **overrides: Any) -> int:
    """Run the (blocking) command off the loop so the in-test server can answer."""
    kwargs: dict[str, Any] = {
        "route": "sentiment",
        "shadow": None,
        "config_path": str(config),
        "admin_url": admin_url,
        "if_ready": False,
        "database_url": None,
        "since": "24h",
        **overrides,
    }
    return await asyncio.to_thread(lambda: promote_command(**kwargs))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- editing the file itself ----------------------------------------------------


async def test_file_mode_swaps_and_asks_the_listener_to_reload(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    token: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original = routes_yaml(port_of(server))
    config = write(tmp_path / "routes.yaml", original)
    assert await promote(config) == 0
    assert config.read_text() == original.replace("primary: v1", "primary: v2").replace(
        "[v2, v3]", "[v1, v3]"
    )
    assert fake.calls == [("/admin/reload", {}, f"Bearer {token}")]
    out = capsys.readouterr().out
    assert "'v2' is now the primary" in out
    assert "reloaded" in out


async def test_file_mode_named_shadow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, shadow="v3") == 0
    assert "primary: v3   # in production" in config.read_text()
    assert "shadows: [v2, v1]" in config.read_text()


async def test_file_mode_without_a_listener_still_succeeds(
    tmp_path: Path, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config) == 0
    assert "primary: v2" in config.read_text()
    out = capsys.readouterr().out
    assert "no admin listener answered" in out
    assert "watcher or SIGHUP" in out


async def test_file_mode_without_a_token_does_not_ask(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = write(tmp_path / "routes.yaml", routes_yaml(port_of(server)))
    assert await promote(config) == 0
    assert fake.calls == []
    assert f"${TOKEN_ENV} is not set" in capsys.readouterr().out


async def test_file_mode_reload_rejected_is_an_error(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    token: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake.answer = (400, {"error": "routes.yaml:9: routes[0].primary: unknown upstream 'v2'"})
    config = write(tmp_path / "routes.yaml", routes_yaml(port_of(server)))
    assert await promote(config) == 2
    assert "unknown upstream 'v2'" in capsys.readouterr().err


async def test_file_mode_unknown_route_names_route_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = routes_yaml(free_port())
    config = write(tmp_path / "routes.yaml", original)
    assert await promote(config, route="ranker") == 2
    err = capsys.readouterr().err
    assert "'ranker'" in err
    assert str(config) in err
    assert config.read_text() == original


async def test_file_mode_unknown_shadow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, shadow="v9") == 2
    assert "v2, v3" in capsys.readouterr().err


async def test_file_mode_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await promote(tmp_path / "absent.yaml") == 2
    assert "absent.yaml: no such file" in capsys.readouterr().err


async def test_file_mode_symlinked_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = write(tmp_path / "real.yaml", routes_yaml(free_port()))
    link = tmp_path / "routes.yaml"
    link.symlink_to(target.name)
    assert await promote(link) == 2
    assert "edit the ConfigMap instead" in capsys.readouterr().err


async def test_file_mode_read_only_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    os.chmod(config, 0o444)
    assert await promote(config) == 2
    assert "read-only" in capsys.readouterr().err


# --- through the admin endpoint ---------------------------------------------------


async def test_admin_mode_posts_route_and_shadow_with_the_token(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    token: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original = routes_yaml(free_port())
    config = write(tmp_path / "routes.yaml", original)
    url = str(server.make_url("/"))
    assert await promote(config, admin_url=url, shadow="v3") == 0
    assert fake.calls == [
        ("/admin/promote", {"route": "sentiment", "shadow": "v3"}, f"Bearer {token}")
    ]
    assert "'v3' is now the primary" in capsys.readouterr().out
    assert config.read_text() == original  # the proxy edits its own file


async def test_admin_mode_with_unreadable_config_uses_the_default_token_env(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHADOWPROXY_ADMIN_TOKEN", TOKEN)
    url = str(server.make_url(""))
    assert await promote(tmp_path / "absent.yaml", admin_url=url) == 0
    assert fake.calls == [("/admin/promote", {"route": "sentiment"}, f"Bearer {TOKEN}")]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, {"error": "routes.yaml: unknown route 'sentiment' (routes: a)"}, "unknown route"),
        (404, {"error": "route 'sentiment' has no shadow 'v9' (its shadows: v2)"}, "no shadow"),
        (409, {"error": "routes.yaml: is a symlink; edit the ConfigMap instead"}, "ConfigMap"),
        (403, {"error": "disabled", "enable": "set $X to a secret and restart"}, "set $X"),
        (400, {"error": "routes.yaml:3: bad"}, "routes.yaml:3: bad"),
        (500, {"error": "internal error"}, "500"),
    ],
)
async def test_admin_mode_refusals_exit_2_with_the_message(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    token: str,
    capsys: pytest.CaptureFixture[str],
    status: int,
    body: dict[str, Any],
    expected: str,
) -> None:
    fake.answer = (status, body)
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, admin_url=str(server.make_url("/"))) == 2
    assert expected in capsys.readouterr().err


async def test_admin_mode_wrong_token_is_401(
    tmp_path: Path,
    server: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, admin_url=str(server.make_url("/"))) == 2
    assert f"refused the token in ${TOKEN_ENV} (401)" in capsys.readouterr().err


async def test_admin_mode_without_token_fails_before_sending(
    tmp_path: Path,
    server: TestServer,
    fake: FakeAdmin,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, admin_url=str(server.make_url("/"))) == 2
    assert f"set ${TOKEN_ENV}" in capsys.readouterr().err
    assert fake.calls == []


async def test_admin_mode_unreachable(
    tmp_path: Path, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, admin_url=f"http://127.0.0.1:{free_port()}") == 2
    assert "cannot reach" in capsys.readouterr().err


async def test_admin_mode_never_follows_a_redirect_with_the_token(
    tmp_path: Path,
    aiohttp_server: AiohttpServer,
    server: TestServer,
    fake: FakeAdmin,
    token: str,
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(server.make_url("/admin/promote?route=sentiment")))

    app = web.Application()
    app.router.add_post("/admin/promote", redirect)
    redirector = await aiohttp_server(app)
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    assert await promote(config, admin_url=str(redirector.make_url("/"))) == 2
    assert fake.calls == []


# --- --if-ready -------------------------------------------------------------------------


class FakeGate:
    def __init__(self, code: int) -> None:
        self.code = code
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self,
        *,
        config_path: str,
        database_url: str | None,
        route: str,
        shadow: str | None,
        since: str,
    ) -> int:
        self.calls.append(
            {"config_path": config_path, "database_url": database_url, "route": route,
             "shadow": shadow, "since": since}
        )  # fmt: skip
        return self.code


@pytest.mark.parametrize(("code", "message"), [(1, "did not pass"), (3, "too few samples")])
async def test_if_ready_not_ready_promotes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], code: int, message: str
) -> None:
    original = routes_yaml(free_port())
    config = write(tmp_path / "routes.yaml", original)
    gate = FakeGate(code)
    assert await promote(config, if_ready=True, gate=gate, database_url="sqlite:///x.db") == code
    assert config.read_text() == original
    assert message in capsys.readouterr().err
    assert gate.calls == [
        {"config_path": str(config), "database_url": "sqlite:///x.db", "route": "sentiment",
         "shadow": "v2", "since": "24h"}
    ]  # fmt: skip


async def test_if_ready_ready_promotes(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    gate = FakeGate(0)
    assert await promote(config, if_ready=True, gate=gate, shadow="v3", since="7d") == 0
    assert "primary: v3" in config.read_text()
    assert (gate.calls[0]["shadow"], gate.calls[0]["since"]) == ("v3", "7d")


async def test_if_ready_in_admin_mode_gates_before_the_request(
    tmp_path: Path, server: TestServer, fake: FakeAdmin, token: str
) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    url = str(server.make_url("/"))
    assert await promote(config, admin_url=url, if_ready=True, gate=FakeGate(1)) == 1
    assert fake.calls == []
    assert await promote(config, admin_url=url, if_ready=True, gate=FakeGate(0)) == 0
    assert len(fake.calls) == 1


async def test_if_ready_unknown_route_in_file_mode_exits_2_before_the_gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(free_port()))
    gate = FakeGate(0)
    assert await promote(config, route="ranker", if_ready=True, gate=gate) == 2
    assert gate.calls == []
    assert "'ranker'" in capsys.readouterr().err


# --- reading the admin section ------------------------------------------------------------


def test_admin_settings_reads_leniently(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", routes_yaml(9999, token_env="MY_TOKEN", host='"::"'))
    settings = admin_settings(str(config))
    assert (settings.host, settings.port, settings.token_env) == ("::", 9999, "MY_TOKEN")
    broken = write(tmp_path / "broken.yaml", "admin: [unclosed\n")
    assert admin_settings(str(broken)).token_env == "SHADOWPROXY_ADMIN_TOKEN"
    assert admin_settings(str(tmp_path / "absent.yaml")).port == 9901
