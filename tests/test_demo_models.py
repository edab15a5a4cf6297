"""The demo model servers: real iris classifiers behind aiohttp, tested on loopback."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shadowproxy.demo.models import MAX_INSTANCES, build_model_app, sample_instances, train

Client = TestClient[Any, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.8, 2.2]


@pytest.fixture
async def primary(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(build_model_app("primary"))


@pytest.fixture
async def candidate(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(build_model_app("candidate", latency_ms=0))


async def _predict(client: Client, payload: object, **headers: str) -> tuple[int, Any]:
    response = await client.post("/predict", data=orjson.dumps(payload), headers=headers)
    assert response.content_type == "application/json"
    return response.status, orjson.loads(await response.read())


async def test_single_instance_shape_is_what_the_demo_route_compares(primary: Client) -> None:
    status, body = await _predict(primary, {"instances": [SETOSA]}, **{"X-Request-ID": "r-1"})
    assert status == 200
    assert body["prediction"] == "setosa"
    assert isinstance(body["confidence"], float) and 0.5 < body["confidence"] <= 1.0
    assert body["predictions"] == [{"label": "setosa", "confidence": body["confidence"]}]
    assert body["model_version"] == "iris-logreg-v1"
    assert body["request_id"] == "r-1"


async def test_answers_are_deterministic_across_requests_and_restarts(
    primary: Client, aiohttp_client: MakeClient
) -> None:
    payload = {"instances": [VIRGINICA]}
    _, first = await _predict(primary, payload, **{"X-Request-ID": "same"})
    _, again = await _predict(primary, payload, **{"X-Request-ID": "same"})
    restarted = await aiohttp_client(build_model_app("primary"))
    _, fresh = await _predict(restarted, payload, **{"X-Request-ID": "same"})
    assert first == again == fresh


async def test_inputs_key_flat_instance_and_batches(candidate: Client) -> None:
    _, by_inputs = await _predict(candidate, {"inputs": [SETOSA]})
    _, flat = await _predict(candidate, {"instances": SETOSA})
    assert by_inputs["prediction"] == flat["prediction"] == "setosa"
    assert by_inputs["model_version"] == "iris-tree-v2"

    status, batch = await _predict(candidate, {"instances": [SETOSA, VIRGINICA]})
    assert status == 200
    assert batch["prediction"] == ["setosa", "virginica"]
    confidences = [p["confidence"] for p in batch["predictions"]]
    assert batch["confidence"] == pytest.approx(sum(confidences) / 2, abs=1e-4)


async def test_request_id_is_generated_when_absent(primary: Client) -> None:
    _, one = await _predict(primary, {"instances": [SETOSA]})
    _, two = await _predict(primary, {"instances": [SETOSA]})
    assert one["request_id"] and one["request_id"] != two["request_id"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2, 3]",
        b"{}",
        b'{"instances": []}',
        b'{"instances": [[1, 2, 3]]}',
        b'{"instances": [[1, 2, "x", 4]]}',
        b'{"instances": [[1, 2, true, 4]]}',
        b'{"instances": [[1, 2, 3, 4], [1, 2]]}',
        b'{"instances": "1,2,3,4"}',
        orjson.dumps({"instances": [SETOSA] * (MAX_INSTANCES + 1)}),
    ],
)
async def test_bad_input_is_a_400_json_error(primary: Client, body: bytes) -> None:
    response = await primary.post("/predict", data=body, headers={"X-Request-ID": "bad-1"})
    assert response.status == 400
    error = orjson.loads(await response.read())
    assert error["request_id"] == "bad-1"
    assert isinstance(error["error"], str) and error["error"]


async def test_healthz(primary: Client, candidate: Client) -> None:
    for client, role in ((primary, "primary"), (candidate, "candidate")):
        response = await client.get("/healthz")
        assert response.status == 200
        assert (await response.json())["role"] == role


async def test_candidate_is_slower(aiohttp_client: MakeClient) -> None:
    slow = await aiohttp_client(build_model_app("candidate", latency_ms=30))
    started = time.perf_counter()
    status, _ = await _predict(slow, {"instances": [SETOSA]})
    assert status == 200
    assert time.perf_counter() - started >= 0.025
    assert train("candidate").latency_s > train("primary").latency_s == 0.0


def test_candidate_agrees_on_most_demo_traffic_but_not_all() -> None:
    rows = np.asarray(sample_instances(2000))
    primary = [p.label for p in train("primary").predict(rows)]
    candidate = [p.label for p in train("candidate").predict(rows)]
    agreement = sum(a == b for a, b in zip(primary, candidate, strict=True)) / len(rows)
    # Different enough to fail the demo gate (0.95), close enough to be a plausible candidate.
    assert 0.85 <= agreement < 0.97


def test_training_is_fast() -> None:
    started = time.perf_counter()
    train("primary")
    train("candidate")
    assert time.perf_counter() - started < 1.0


def test_sample_instances_are_reproducible_and_valid() -> None:
    rows = sample_instances(50, seed=3)
    assert rows == sample_instances(50, seed=3)
    assert rows != sample_instances(50, seed=4)
    assert all(len(row) == 4 and min(row) > 0 for row in rows)


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        train("shadow")
