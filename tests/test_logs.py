from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from shadowproxy.telemetry.logs import (
    MAX_VALUE_CHARS,
    REDACTED,
    configure_logging,
    is_secret_key,
    sanitize,
    scrub_secrets,
)


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_iso_utc_timestamp(out: io.StringIO) -> None:
    configure_logging(stream=out)
    structlog.get_logger("t").info("config_reloaded", sha256="abc", routes=2)
    [line] = lines(out)
    assert line["event"] == "config_reloaded"
    assert line["level"] == "info"
    assert (line["sha256"], line["routes"]) == ("abc", 2)
    ts = datetime.fromisoformat(line["timestamp"])
    assert ts.utcoffset() == UTC.utcoffset(None)


def test_crlf_and_control_characters_cannot_forge_lines(out: io.StringIO) -> None:
    configure_logging(stream=out)
    forged = '/predict\r\n{"event": "admin_login", "level": "info"}'
    structlog.get_logger().warning(
        "bad request\nsecond line", path=forged, agent="\x1b[31mred\x1b[0m\u2028x\ttab"
    )
    assert out.getvalue().count("\n") == 1
    [line] = lines(out)
    assert line["event"] == "bad request\\nsecond line"
    assert line["path"] == '/predict\\r\\n{"event": "admin_login", "level": "info"}'
    assert line["agent"] == "\\x1b[31mred\\x1b[0m\\u2028x\\ttab"


def test_console_renderer_is_escaped_too(out: io.StringIO) -> None:
    configure_logging(json=False, stream=out)
    structlog.get_logger().info("evt", path="/a\r\nINFO forged")
    assert out.getvalue().count("\n") == 1
    assert "INFO forged" in out.getvalue()  # on the same line, repr()-escaped by the renderer


def test_nested_values_and_keys_are_escaped() -> None:
    event = sanitize(None, "info", {"event": "e", "headers": {"x-a\nb": ["v\r1", ("v\n2",)]}})
    assert event["headers"] == {"x-a\\nb": ["v\\r1", ["v\\n2"]]}


def test_long_values_are_truncated(out: io.StringIO) -> None:
    configure_logging(stream=out)
    structlog.get_logger().info("evt", body="x" * 100_000, short="ok", n=10**30)
    [line] = lines(out)
    assert len(line["body"]) < MAX_VALUE_CHARS + 40
    assert line["body"].endswith(f"[{100_000 - MAX_VALUE_CHARS} more chars]")
    assert (line["short"], line["n"]) == ("ok", 10**30)


@pytest.mark.parametrize(
    "key",
    [
        "authorization",
        "Authorization",
        "proxy-authorization",
        "Proxy-Authorization",
        "cookie",
        "set-cookie",
        "token",
        "admin_token",
        "access_token",
        "password",
        "db_password",
        "secret",
        "api_key",
        "X-Api-Key",
        "secret_key",
        "credentials",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["token_env", "max_tokens", "prompt_tokens", "event", "route", "sha256", "path"]
)
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_secrets_are_scrubbed_at_any_depth(out: io.StringIO) -> None:
    configure_logging(stream=out)
    structlog.get_logger().info(
        "upstream_request",
        authorization="Bearer abc.def",
        password="hunter2",
        headers={"Authorization": "Basic dXNlcjpwYXNz", "Cookie": "sid=1", "Accept": "*/*"},
        raw_headers=[("Proxy-Authorization", "Bearer zzz"), ("Host", "model")],
        note="client sent Authorization: Bearer eyJhbGciOi.payload.sig in the body",
        token_env="SHADOWPROXY_ADMIN_TOKEN",
        max_tokens=256,
    )
    [line] = lines(out)
    text = out.getvalue()
    for secret in ("abc.def", "hunter2", "dXNlcjpwYXNz", "sid=1", "zzz", "eyJhbGciOi"):
        assert secret not in text
    assert line["authorization"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "Cookie": REDACTED, "Accept": "*/*"}
    assert line["raw_headers"] == [["Proxy-Authorization", REDACTED], ["Host", "model"]]
    assert line["note"] == f"client sent Authorization: Bearer {REDACTED} in the body"
    assert line["token_env"] == "SHADOWPROXY_ADMIN_TOKEN"
    assert line["max_tokens"] == 256


def test_scrub_processor_alone() -> None:
    event = scrub_secrets(None, "info", {"event": "e", "Cookie": "a=b", "n": 1})
    assert event == {"event": "e", "Cookie": REDACTED, "n": 1}


def test_level_filters(out: io.StringIO) -> None:
    configure_logging(level="warning", stream=out)
    log = structlog.get_logger()
    log.info("quiet")
    log.warning("loud")
    logging.getLogger("aiohttp.access").info("quiet too")
    assert [line["event"] for line in lines(out)] == ["loud"]


def test_unknown_level() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging(level="verbose")


def test_exceptions_stay_on_one_line(out: io.StringIO) -> None:
    configure_logging(stream=out)
    try:
        raise RuntimeError("boom\nfake line")
    except RuntimeError:
        structlog.get_logger().exception("reload_failed", path="routes.yaml")
    assert out.getvalue().count("\n") == 1
    [line] = lines(out)
    assert "RuntimeError: boom" in line["exception"]
    assert line["level"] == "error"


def test_stdlib_loggers_share_the_chain(out: io.StringIO) -> None:
    configure_logging(stream=out)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("aiohttp.server").error("Error handling request\r\nforged", exc_info=True)
    assert out.getvalue().count("\n") == 1
    [line] = lines(out)
    assert line["logger"] == "aiohttp.server"
    assert line["level"] == "error"
    assert line["event"] == "Error handling request\\r\\nforged"
    assert "ValueError: bad" in line["exception"]
    assert "timestamp" in line


def test_reconfiguring_does_not_stack_handlers(out: io.StringIO) -> None:
    configure_logging(stream=out)
    configure_logging(stream=out)
    logging.getLogger("x").warning("once")
    assert len(lines(out)) == 1
