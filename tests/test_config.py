"""routes.yaml parsing: defaults, typed values, and errors that name file, line and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shadowproxy.base.errors import ConfigError
from shadowproxy.config.load import load_settings
from shadowproxy.config.settings import CompareSettings, GateSettings, MirrorSettings

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
upstreams:
  v1: {url: http://127.0.0.1:9001}
  v2: {url: http://127.0.0.1:9002}
routes:
  - name: r
    primary: v1
    shadows: [v2]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    return str(info.value)


def test_product_example_parses_with_every_key() -> None:
    settings = load_settings(str(ROOT / "config" / "routes.yaml"))
    route = settings.routes[0]
    assert route.name == "sentiment"
    assert route.match.path_prefix == "/predict" and route.match.methods == ("POST",)
    assert (route.primary, route.shadows) == ("sentiment-v1", ("sentiment-v2",))
    assert route.mirror == MirrorSettings(200, 1048576, "X-Shadow-Request")
    assert route.compare == CompareSettings(
        preset=None,
        label="prediction",
        score="confidence",
        tolerance=0.01,
        ignore=("request_id", "model_version"),
    )
    assert route.gate == GateSettings(100, 0.95, 1.2, 0.0, 0.01)
    assert settings.storage.redact.headers == ("authorization", "cookie")
    assert settings.storage.redact.json == ("input.ssn",)
    assert settings.upstreams["sentiment-v1"].max_connections == 100
    assert settings.upstreams["sentiment-v2"].timeout_ms == 2000
    assert settings.admin.port == 9901 and settings.metrics.window == 1000
    assert len(settings.sha256) == 64


def test_defaults_for_everything_but_upstreams_and_routes(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.server.port == 8080 and settings.server.max_body_bytes == 10485760
    assert settings.storage.url == "sqlite:///shadowproxy.db"
    assert settings.routes[0].match.path_prefix == "/"
    assert settings.routes[0].sample_rate == 1.0
    assert settings.admin.host == "127.0.0.1"  # admin never listens beyond loopback unless asked
    assert settings.admin.token_env == "SHADOWPROXY_ADMIN_TOKEN"


def test_preset_fills_and_explicit_keys_override(tmp_path: Path) -> None:
    text = MINIMAL + "    compare: {preset: kserve-v2, ignore: [id]}\n"
    compare = load_settings(write(tmp_path, text)).routes[0].compare
    assert compare.preset == "kserve-v2"
    assert compare.label == "outputs[*].data"
    assert compare.ignore == ("id",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL.replace("primary: v1", "primary: sentiment-v3"),
            "routes.yaml:6: routes[0].primary: unknown upstream 'sentiment-v3'",
        ),
        (
            MINIMAL.replace("shadows: [v2]", "shadows: [v2, nope]"),
            "routes.yaml:7: routes[0].shadows[1]: unknown upstream 'nope'",
        ),
        (
            MINIMAL.replace("shadows: [v2]", "shadows: [v1]"),
            "routes.yaml:7: routes[0].shadows[0]: 'v1' is the route's primary",
        ),
        (
            MINIMAL + "    sample_rate: lots\n",
            "routes.yaml:8: routes[0].sample_rate: expected a number, got 'lots'",
        ),
        (
            MINIMAL + "    sample_rate: 1.5\n",
            "routes.yaml:8: routes[0].sample_rate: must be at most 1",
        ),
        (
            MINIMAL + "    compare: {tolerance: abc}\n",
            "routes.yaml:8: routes[0].compare.tolerance: expected a number, got 'abc'",
        ),
        (
            MINIMAL + "    compare: {label: 'a[', score: b}\n",
            "routes.yaml:8: routes[0].compare.label: invalid JMESPath expression 'a['",
        ),
        (
            MINIMAL + "    compare: {ignore: [ok, 'a..b']}\n",
            "routes.yaml:8: routes[0].compare.ignore[1]: invalid path 'a..b'",
        ),
        (
            MINIMAL + "    compare: {preset: nope}\n",
            "routes.yaml:8: routes[0].compare.preset: unknown preset 'nope'",
        ),
        (
            MINIMAL + "    mirrors: {}\n",
            "routes.yaml:8: routes[0].mirrors: unknown key (expected one of:",
        ),
        (
            MINIMAL + "    match: {path: nope}\n",
            "routes.yaml:8: routes[0].match.path: must start with '/'",
        ),
        (
            MINIMAL + "    match: {methods: [FETCH]}\n",
            "routes.yaml:8: routes[0].match.methods[0]: unknown HTTP method 'FETCH'",
        ),
        (
            MINIMAL + "    gate: {min_samples: ten}\n",
            "routes.yaml:8: routes[0].gate.min_samples: expected a whole number, got 'ten'",
        ),
        ("server: {port: 99999}\n" + MINIMAL, "routes.yaml:1: server.port: must be at most 65535"),
        ("server: {portt: 1}\n" + MINIMAL, "routes.yaml:1: server.portt: unknown key"),
        (
            "storage: {url: 'mysql://x'}\n" + MINIMAL,
            "routes.yaml:1: storage.url: unsupported storage url 'mysql://x'",
        ),
        (
            "admin: {watch_config: maybe}\n" + MINIMAL,
            "routes.yaml:1: admin.watch_config: expected true or false, got 'maybe'",
        ),
        ("version: 2\n" + MINIMAL, "routes.yaml:1: version: unsupported version (expected 1)"),
        (
            MINIMAL.replace("http://127.0.0.1:9001", "ftp://x"),
            "routes.yaml:2: upstreams.v1.url: expected an absolute http(s) URL",
        ),
        (
            MINIMAL + "  - name: r\n    primary: v1\n",
            "routes.yaml:8: routes[1].name: duplicate route name 'r'",
        ),
        (MINIMAL + "upstreams: {}\n", "routes.yaml:8: upstreams: duplicate key"),
        ("routes: []\n", "routes.yaml:1: missing required key 'upstreams'"),
        (MINIMAL + "  - {name: x}\n", "routes.yaml:8: routes[1]: missing required key 'primary'"),
        ("upstreams: [\n", "routes.yaml:2: invalid YAML"),
        ("", "routes.yaml: empty config"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert error_of(tmp_path, text).startswith(expected)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path / "absent.yaml"))


def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, MINIMAL)
    ok = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check", "--config", good],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK (1 routes, 2 upstreams, 1 shadows" in ok.stdout
    bad = write(tmp_path, MINIMAL.replace("primary: v1", "primary: v3"))
    result = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check", "--config", bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "routes.yaml:6: routes[0].primary: unknown upstream 'v3'" in result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_config_path_from_environment(tmp_path: Path) -> None:
    good = write(tmp_path, MINIMAL)
    env = {"SHADOWPROXY_CONFIG": good, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert good in result.stdout
