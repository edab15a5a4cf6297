"""Two small but real model servers for the demo: iris classifiers trained at start-up.

``primary`` is a logistic regression; ``candidate`` is a depth-2 decision tree that
answers ``extra latency`` later. Both are trained on scikit-learn's bundled iris
data set with fixed seeds, so they answer deterministically and disagree on a few
per cent of realistic inputs (mostly versicolor/virginica near the boundary).

``POST /predict`` takes ``{"instances": [[f1, f2, f3, f4], ...]}`` (or ``"inputs"``;
a flat list of four numbers is one instance) and answers::

    {"prediction": "setosa", "confidence": 0.9731,
     "predictions": [{"label": "setosa", "confidence": 0.9731}],
     "model_version": "iris-logreg-v1", "request_id": "..."}

so that ``compare: {label: prediction, score: confidence}`` works. For a batch,
``prediction`` is the list of labels and ``confidence`` their mean. Bad input gets
400 ``{"error": ..., "request_id": ...}``. ``GET /healthz`` answers 200.

Standalone: ``python -m shadowproxy.demo.models --role primary --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

ROLES = ("primary", "candidate")
DEFAULT_PORTS = {"primary": 9001, "candidate": 9002}
DEFAULT_LATENCY_MS = {"primary": 0.0, "candidate": 10.0}
MAX_INSTANCES = 1000
SEED = 0

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    confidence: float


@dataclass(frozen=True, slots=True)
class DemoModel:
    role: str
    version: str
    estimator: Any  # a fitted scikit-learn classifier
    class_names: tuple[str, ...]
    n_features: int
    latency_s: float

    def predict(self, rows: FloatArray) -> list[Prediction]:
        probabilities: FloatArray = self.estimator.predict_proba(rows)
        best = probabilities.argmax(axis=1)
        return [
            Prediction(self.class_names[int(k)], round(float(p[k]), 4))
            for k, p in zip(best, probabilities, strict=True)
        ]


MODEL_KEY = web.AppKey("model", DemoModel)


def train(role: str, *, latency_ms: float | None = None) -> DemoModel:
    """Fit the model for ``role`` (a few tens of milliseconds)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    iris = load_iris()
    if role == "primary":
        estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        version = "iris-logreg-v1"
    else:
        estimator = DecisionTreeClassifier(max_depth=2, random_state=SEED)
        version = "iris-tree-v2"
    estimator.fit(iris.data, iris.target)
    latency = DEFAULT_LATENCY_MS[role] if latency_ms is None else latency_ms
    return DemoModel(
        role=role,
        version=version,
        estimator=estimator,
        class_names=tuple(str(name) for name in iris.target_names),
        n_features=int(iris.data.shape[1]),
        latency_s=max(latency, 0.0) / 1000.0,
    )


def sample_instances(count: int, *, seed: int = SEED, noise: float = 0.25) -> list[list[float]]:
    """Realistic inputs: iris rows with Gaussian noise of ``noise`` feature standard deviations."""
    data: FloatArray = load_iris().data
    rng = np.random.default_rng(seed)
    rows = data[rng.integers(0, len(data), count)]
    jittered = rows + rng.normal(0.0, noise, rows.shape) * data.std(axis=0)
    return [[round(float(v), 2) for v in row] for row in np.clip(jittered, 0.1, None)]


class BadInput(ValueError):
    pass


def parse_instances(body: bytes, n_features: int) -> FloatArray:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadInput('expected a JSON object {"instances": [[...], ...]}')
    key = "instances" if "instances" in doc else "inputs"
    instances = doc.get(key)
    if not isinstance(instances, list) or not instances:
        raise BadInput('expected "instances" (or "inputs"): a non-empty list')
    if all(_is_number(v) for v in instances):
        instances = [instances]
    if len(instances) > MAX_INSTANCES:
        raise BadInput(f"at most {MAX_INSTANCES} instances per request, got {len(instances)}")
    for i, row in enumerate(instances):
        if not isinstance(row, list) or len(row) != n_features:
            raise BadInput(f"{key}[{i}]: expected a list of {n_features} numbers")
        if not all(_is_number(v) and math.isfinite(v) for v in row):
            raise BadInput(f"{key}[{i}]: expected finite numbers, got {row!r}")
    return np.asarray(instances, dtype=np.float64)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


async def predict(request: web.Request) -> web.Response:
    model = request.app[MODEL_KEY]
    request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
    try:
        rows = parse_instances(await request.read(), model.n_features)
    except BadInput as exc:
        return _json({"error": str(exc), "request_id": request_id}, status=400)
    predictions = model.predict(rows)
    if model.latency_s:
        await asyncio.sleep(model.latency_s)
    single = len(predictions) == 1
    labels = [p.label for p in predictions]
    confidences = [p.confidence for p in predictions]
    mean_confidence = round(sum(confidences) / len(confidences), 4)
    return _json(
        {
            "prediction": labels[0] if single else labels,
            "confidence": confidences[0] if single else mean_confidence,
            "predictions": [{"label": p.label, "confidence": p.confidence} for p in predictions],
            "model_version": model.version,
            "request_id": request_id,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    model = request.app[MODEL_KEY]
    return _json({"status": "ok", "role": model.role, "model_version": model.version})


def build_model_app(role: str, *, latency_ms: float | None = None) -> web.Application:
    """The aiohttp app serving ``role``; ``latency_ms`` overrides the role's artificial delay."""
    app = web.Application()
    app[MODEL_KEY] = train(role, latency_ms=latency_ms)
    app.router.add_post("/predict", predict)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shadowproxy.demo.models", description="Serve one demo iris model."
    )
    parser.add_argument("--role", choices=ROLES, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, help="default: 9001 primary, 9002 candidate")
    parser.add_argument("--latency-ms", type=float, help="artificial delay per request")
    args = parser.parse_args(argv)
    port: int = args.port if args.port is not None else DEFAULT_PORTS[args.role]
    app = build_model_app(args.role, latency_ms=args.latency_ms)
    print(f"demo model {app[MODEL_KEY].version} ({args.role}) on http://{args.host}:{port}")
    web.run_app(app, host=args.host, port=port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
