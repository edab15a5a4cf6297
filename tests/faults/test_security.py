"""Secrets and injection: nothing sensitive in logs, rows, error bodies or metric labels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.fakemodel import fake_model
from tests.processes import serve
from tests.proxyharness import free_port, write_config

SECRETS = (
    "SECRET-AUTH-123",
    "SECRET-COOKIE-456",
    "SECRET-PROXY-789",
    "123-45-6789",
    "WRONG-TOKEN-000",
)


ANSWER = {"prediction": "a", "input": {"ssn": "123-45-6789"}}  # echoes PII back


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return response


async def test_no_secret_or_pii_reaches_logs_rows_errors_or_metrics(tmp_path: Path) -> None:
    primary, shadow = await fake_model(ANSWER), await fake_model(ANSWER)
    urls = {
        "p": str(primary.make_url("")).rstrip("/"),
        "s": str(shadow.make_url("")).rstrip("/"),
        "down": f"http://127.0.0.1:{free_port()}",
    }
    config = write_config(
        tmp_path,
        urls,
        [
            {
                "name": "predict",
                "match": {"path_prefix": "/predict"},
                "primary": "p",
                "shadows": ["s"],
            },
            {"name": "broken", "match": {"path_prefix": "/broken"}, "primary": "down"},
        ],
        server={"access_log": True},
        storage={"redact": {"headers": ["authorization", "cookie"], "json": ["input.ssn"]}},
    )
    body = json.dumps({"input": {"ssn": "123-45-6789", "text": "hello"}}).encode()
    secret_headers = (
        b"Authorization: Bearer SECRET-AUTH-123\r\nCookie: session=SECRET-COOKIE-456\r\n"
        b"Proxy-Authorization: Basic SECRET-PROXY-789\r\nContent-Type: application/json\r\n"
    )
    with serve(config, env={"SHADOWPROXY_ADMIN_TOKEN": "the-real-token"}) as proc:
        await proc.ready()
        for path in (b"/predict/%0d%0aX-Injected:%20yes", b"/broken/x"):
            head = (
                b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + secret_headers
            )
            response = await raw_request(
                proc.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            assert response.startswith(
                b"HTTP/1.1 200" if path.startswith(b"/predict") else b"HTTP/1.1 502"
            )
            if path.startswith(b"/broken"):
                assert not any(
                    s.encode() in response for s in SECRETS
                )  # error bodies name no secret
        async with aiohttp.ClientSession() as client:
            async with client.get(
                proc.admin + "/admin/status", headers={"Authorization": "Bearer WRONG-TOKEN-000"}
            ) as r:
                assert r.status == 401
            # Admin paths on the proxy port are routed like any path, never executed.
            async with client.post(
                proc.url + "/admin/reload", headers={"Authorization": "Bearer the-real-token"}
            ) as r:
                assert r.status == 404
            async with asyncio.timeout(10):
                while True:
                    async with client.get(proc.admin + "/metrics") as r:
                        metrics = await r.text()
                    if 'shadowproxy_records_total{outcome="written"} 1.0' in metrics:
                        break
                    await asyncio.sleep(0.05)
        assert 'shadowproxy_config_reloads_total{outcome="ok"}' not in metrics
    logs = proc.output()
    rows = [
        json.loads(line)
        for f in (tmp_path / "records").glob("shadow_log-*.jsonl")
        for line in f.read_text().splitlines()
    ]
    stored = "\n".join(f.read_text(errors="replace") for f in (tmp_path / "records").iterdir())
    for secret in SECRETS:
        assert secret not in logs, secret
        assert secret not in stored, secret
        assert secret not in metrics, secret
    assert len(rows) == 1
    headers = {k.lower(): v for k, v in rows[0]["request_headers"].items()}
    assert headers["authorization"] == "[REDACTED]"
    assert headers["cookie"] == "[REDACTED]"
    assert "proxy-authorization" not in headers  # hop-by-hop: dropped
    assert json.loads(rows[0]["request_body"])["input"] == {"ssn": "[REDACTED]", "text": "hello"}
    assert json.loads(rows[0]["primary_body"])["input"]["ssn"] == "[REDACTED]"
    # Log injection: the CR/LF from the path is escaped; every log record is one JSON line.
    access = [
        json.loads(line) for line in logs.splitlines() if '"request"' in line and "/predict" in line
    ]
    assert len(access) == 1
    assert "\r" not in access[0]["path"] and "\n" not in access[0]["path"]
    assert "X-Injected" in access[0]["path"]
    assert all(line.startswith("{") for line in logs.splitlines() if line.strip())
    await primary.close()
    await shadow.close()
