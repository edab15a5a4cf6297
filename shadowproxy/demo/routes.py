"""The demo's routes.yaml: the iris primary with the slower tree in its shadow, recorded to SQLite."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ROUTE = "predict"
PRIMARY = "iris-v1"
CANDIDATE = "iris-v2"


@dataclass(frozen=True, slots=True)
class DemoRoutes:
    directory: Path  # absolute
    port: int
    admin_port: int
    primary_url: str
    candidate_url: str

    @property
    def path(self) -> Path:
        return self.directory / "routes.yaml"

    @property
    def database(self) -> Path:
        return self.directory / "shadowproxy-demo.db"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.database}"  # absolute path: sqlite:////abs/file.db


def render_routes(routes: DemoRoutes) -> str:
    def q(value: object) -> str:  # a JSON string is a valid YAML double-quoted scalar
        return json.dumps(str(value))

    return f"""\
# Written by `shadowproxy demo`, rewritten at each run (the model ports change).
version: 1
server: {{host: 127.0.0.1, port: {routes.port}}}
admin: {{host: 127.0.0.1, port: {routes.admin_port}, token_env: SHADOWPROXY_ADMIN_TOKEN, watch_config: true}}
storage:
  url: {q(routes.database_url)}
  spool_dir: {q(routes.directory / "spool")}
  store_bodies: true
metrics: {{window: 1000}}
upstreams:
  {PRIMARY}: {{url: {q(routes.primary_url)}, timeout_ms: 1000}}  # logistic regression
  {CANDIDATE}: {{url: {q(routes.candidate_url)}, timeout_ms: 2000}}  # depth-2 tree, +10 ms
routes:
  - name: {ROUTE}
    match: {{path_prefix: /predict, methods: [POST]}}
    primary: {PRIMARY}
    shadows: [{CANDIDATE}]
    sample_rate: 1.0
    compare:
      label: prediction
      score: confidence
      ignore: [request_id, model_version]
    gate: {{min_samples: 100, min_agreement: 0.95, max_latency_ratio: 1.2,
           min_score_delta: 0.0, max_shadow_error_rate: 0.01}}
"""


def write_routes(routes: DemoRoutes) -> None:
    """Write atomically, so a watching proxy never reads half a file."""
    scratch = routes.path.with_suffix(".yaml.tmp")
    scratch.write_text(render_routes(routes))
    os.replace(scratch, routes.path)
