"""shadowproxy benchmark harness: direct vs nginx vs nginx `mirror` vs shadowproxy, side by side.

Starts everything on loopback, bounded in time: a fast primary model server and the shadow
model servers (nginx + echo module, one port per behaviour: fast, 50ms, 2s, hang, 500; and
"refuse", a port nobody listens on), then for each scenario, interleaved in one invocation,
the rows

  direct          load straight at the primary (the physical limit)
  nginx           nginx as a plain keep-alive reverse proxy
  nginx-mirror    nginx with the `mirror` directive to the scenario's shadow
  shadowproxy-1w  `shadowproxy serve --workers 1`, recording to a throw-away PostgreSQL DB
  shadowproxy-2w  `shadowproxy serve --workers 2`, same

A scenario is a shadow behaviour with the small JSON request (fast, 50ms, 2s, hang, refuse,
500), or a model-sized body with the fast shadow: body32k (32 KiB JSON in, 8 KiB JSON out) and
upload1m (1 MiB in, small answer out; shadowproxy's body limits raised so that it is mirrored).

Each row runs under two load shapes: closed loop (wrk -t1 -c32 --latency: throughput) and
open loop (bench/loadgen.py at a fixed rate, no coordinated omission: latency). Then a
keep-alive test (N sequential requests on one connection, 2 s shadow) and, in full mode, a
60 s RSS run of shadowproxy against a hanging shadow.

Prints markdown tables (medians of --repeat runs) and issue #13's targets as MET / MISSED, and
writes all raw runs + machine facts as JSON under --out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TEMPLATES = BENCH / "nginx"

SHADOWS = ["fast", "50ms", "2s", "hang", "refuse", "500"]  # shadow behaviours, one port each
SCENARIOS = [*SHADOWS, "body32k", "upload1m"]
ROWS = ["direct", "nginx", "nginx-mirror", "shadowproxy-1w", "shadowproxy-2w"]
SHAPES = ["closed", "open"]
QUICK_SCENARIOS = ["fast", "2s", "body32k"]
# --quick keeps to its time budget: body32k runs only the rows its targets compare (unless
# --rows is given) for 1 s per load run (unless --duration is given)
QUICK_ROWS = {"body32k": ["direct", "nginx-mirror", "shadowproxy-1w"]}
QUICK_DURATION = {"body32k": 1.0}

BODY = '{"inputs":[[5.1,3.5,1.4,0.2]],"id":"bench"}'
KIB, MIB = 1024, 1024 * 1024
BIG_BODY_LIMIT = 16 * MIB  # upload1m: nginx client_max_body_size, shadowproxy's two limits


@dataclass(frozen=True)
class Scenario:
    """What one scenario sends, and where its mirrors go."""

    name: str
    shadow: str  # the shadow behaviour (port) of SHADOWS it mirrors to
    path: str = "/predict"
    body_file: str = "body-small.json"  # in the temp dir, written by write_bodies()
    raise_body_limits: bool = False  # shadowproxy server/mirror max_body_bytes = BIG_BODY_LIMIT


SCENARIO_SPECS: dict[str, Scenario] = {
    **{s: Scenario(s, s) for s in SHADOWS},
    "body32k": Scenario("body32k", "fast", "/predict/body32k", "body-32k.json"),
    "upload1m": Scenario(
        "upload1m", "fast", "/predict/upload1m", "body-1m.json", raise_body_limits=True
    ),
}
ECHO_MODULE_CANDIDATES = [
    "/usr/lib/nginx/modules/ngx_http_echo_module.so",
    "/usr/lib64/nginx/modules/ngx_http_echo_module.so",
    "/usr/local/nginx/modules/ngx_http_echo_module.so",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

Json = dict[str, Any]


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# small helpers


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now and that this run has not handed out before
    (the "refuse" shadow's port must stay unused for the whole run)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def unused_port() -> int:
    """A port for the "refuse" shadow: nobody listens on it, and it lies below the ephemeral
    range, so no outgoing connection can get it as its source port (a TCP self-connect would
    turn "connection refused" into an echo)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in range(max(1025, low - 2000), low):
        if port in _PORTS_GIVEN or port_open(port):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    return free_port()


def parse_cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    available = os.sched_getaffinity(0)
    return (cpus & available) or available


def render(template: str, dest: Path, **values: object) -> Path:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    leftover = re.findall(r"\{\{\w+\}\}", text)
    if leftover:
        raise RuntimeError(f"{template}: unfilled placeholders {leftover}")
    dest.write_text(text)
    return dest


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def http_post_full(url: str, body: str | bytes, timeout: float = 2.0) -> tuple[int, bytes]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def http_post(url: str, body: str | bytes, timeout: float = 2.0) -> int:
    return http_post_full(url, body, timeout)[0]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sized_json(size: int, head: dict[str, object], key: str) -> str:
    """A JSON object of exactly `size` bytes: `head`'s fields, then under `key` a list of
    numbers (model inputs, class probabilities), then a "pad" string to the exact size."""
    prefix = json.dumps(head, separators=(",", ":"))[:-1] + f',"{key}":['
    tail_len = len('],"pad":""}')
    nums: list[str] = []
    used = len(prefix) + tail_len
    while True:
        num = f"{(len(nums) * 7919 % 10000) / 10000:.4f}"
        grow = len(num) + (1 if nums else 0)
        if used + grow > size:
            break
        nums.append(num)
        used += grow
    text = prefix + ",".join(nums) + '],"pad":"' + "x" * (size - used) + '"}'
    assert len(text) == size, (len(text), size)
    return text


def write_bodies(tmp: Path) -> str:
    """The request bodies of the scenarios (files: wrk's Lua script and loadgen read them; 1 MiB
    does not fit a command-line argument); returns the 8 KiB JSON answer of body32k."""
    import base64
    import random

    (tmp / "body-small.json").write_text(BODY)
    (tmp / "body-32k.json").write_text(
        sized_json(32 * KIB, {"id": "bench", "model": "body32k"}, "inputs")
    )
    raw = random.Random(13).randbytes(MIB)  # an "image", base64 in a JSON string
    image = base64.b64encode(raw).decode()
    head = '{"id":"bench","model":"upload1m","image_b64":"'
    (tmp / "body-1m.json").write_text(head + image[: MIB - len(head) - 2] + '"}')
    assert (tmp / "body-1m.json").stat().st_size == MIB
    return sized_json(8 * KIB, {"prediction": "a", "confidence": 0.9}, "probabilities")


def nginx_split_set(name: str, text: str, piece: int = 3000) -> tuple[str, str]:
    """`set` lines that hold `text` in pieces (an nginx config token is limited to 4 KiB) and
    the value that joins them again. `text` must not contain ' \\ or $."""
    assert not set(text) & set("'\\$"), "cannot be put in an nginx single-quoted string"
    parts = [text[i : i + piece] for i in range(0, len(text), piece)]
    lines = "\n".join(f"            set ${name}_{i} '{p}';" for i, p in enumerate(parts))
    return lines, "".join(f"${{{name}_{i}}}" for i in range(len(parts)))


# --------------------------------------------------------------------------------------------
# processes: start pinned, measure the whole tree from /proc, stop by PID only


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def proc_tree(pid: int) -> list[int]:
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Proc:
    """A subprocess we started: pinned to CPUs, output to a log file."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        cpus: set[int] | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()

        def pre() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            with contextlib.suppress(ValueError, OSError):
                import resource

                _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

        self.popen = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            preexec_fn=pre,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        return proc_tree(self.pid) if self.alive() else []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        pids = self.tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) did not stop in {timeout:.0f}s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        deadline = time.monotonic() + 3.0
        for pid in pids[1:]:  # leftovers of this tree only, by PID
            while cpu_ticks(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if cpu_ticks(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


class TreeSampler:
    """Samples CPU ticks and RSS of a process tree in a thread (max RSS, CPU delta)."""

    def __init__(self, proc: Proc | None, interval: float = 0.25) -> None:
        self.proc = proc
        self.interval = interval
        self.start_ticks: dict[int, int] = {}
        self.last_ticks: dict[int, int] = {}
        self.rss_max = 0
        self.rss_series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _sample(self) -> None:
        if self.proc is None:
            return
        rss = 0
        for pid in self.proc.tree():
            ticks = cpu_ticks(pid)
            if ticks is None:
                continue
            self.last_ticks[pid] = ticks
            rss += rss_bytes(pid)
        self.rss_max = max(self.rss_max, rss)
        self.rss_series.append((time.monotonic() - self._t0, rss))

    def __enter__(self) -> TreeSampler:
        self._t0 = time.monotonic()
        if self.proc is not None:
            for pid in self.proc.tree():
                ticks = cpu_ticks(pid)
                if ticks is not None:
                    self.start_ticks[pid] = ticks
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def cpu_seconds(self) -> float | None:
        if self.proc is None:
            return None
        ticks = sum(v - self.start_ticks.get(pid, 0) for pid, v in self.last_ticks.items())
        return ticks / CLK_TCK


# --------------------------------------------------------------------------------------------
# Prometheus text, nginx stub_status, PostgreSQL

_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prom(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_PROM_LABEL.findall(m.group(3) or ""))
        samples.append((m.group(1), labels, value))
    return samples


def prom_sum(
    samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float | None:
    found = [
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    ]
    return sum(found) if found else None


SP_COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "served": ("shadowproxy_requests_total", {"role": "primary"}),
    "mirrored": ("shadowproxy_requests_total", {"role": "shadow"}),
    "shed": ("shadowproxy_mirror_dropped_total", {}),
    "records_written": ("shadowproxy_records_total", {"outcome": "written"}),
    "records_spooled": ("shadowproxy_records_total", {"outcome": "spooled"}),
    "records_dropped": ("shadowproxy_records_total", {"outcome": "dropped"}),
}


def sp_counters(admin_port: int) -> dict[str, float | None]:
    status, text = http_get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"GET /metrics on the admin port answered {status}")
    samples = parse_prom(text)
    out: dict[str, float | None] = {
        key: prom_sum(samples, name, **labels) for key, (name, labels) in SP_COUNTERS.items()
    }
    out["queue_depth"] = prom_sum(samples, "shadowproxy_record_queue_depth")
    out["in_flight"] = prom_sum(samples, "shadowproxy_mirror_in_flight")
    return out


def stub_requests(port: int) -> int | None:
    """nginx stub_status `requests` counter, minus the status request itself."""
    try:
        status, text = http_get(f"http://127.0.0.1:{port}/", timeout=2.0)
    except OSError:
        return None
    m = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M)
    return int(m.group(3)) if status == 200 and m else None


class Database:
    """A throw-away PostgreSQL database, created at start and dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"shadowproxy_bench_{os.getpid()}_{int(time.time())}"
        base = admin_url.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"
        self.created = False

    @staticmethod
    def _run(url: str, sql: str) -> Any:
        async def go() -> Any:
            import asyncpg

            conn = await asyncpg.connect(url, timeout=10)
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()

        return asyncio.run(go())

    def create(self) -> None:
        self._run(self.admin_url, f'CREATE DATABASE "{self.name}"')
        self.created = True

    def drop(self) -> None:
        if self.created:
            self._run(self.admin_url, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.created = False

    def version(self) -> str:
        return str(self._run(self.admin_url, "SHOW server_version"))

    def rows(self) -> int | None:
        try:
            return int(self._run(self.url, "SELECT count(*) FROM shadow_log"))
        except Exception:
            return None

    def truncate(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.url, "TRUNCATE shadow_log")


# --------------------------------------------------------------------------------------------
# load generators


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _wrk_ms(text: str) -> float | None:
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text)
    return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else None


def parse_wrk(out: str, duration: float) -> Json:
    res: Json = {}
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        res["max_ms"] = _wrk_ms(m.group(3))
    for q in (50, 90, 99):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}_ms"] = _wrk_ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    total = int(m.group(1)) if m else 0
    elapsed = (_wrk_ms(m.group(2) + m.group(3)) or duration * 1000) / 1000.0 if m else duration
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    socket_errors = 0
    kinds: dict[str, int] = {}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        for kind, val in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            if int(val):
                kinds[kind] = int(val)
            socket_errors += int(val)
    if non2xx:
        kinds["non_2xx"] = non2xx
    res.update(
        completed=total,
        ok=total - non2xx,
        errors=socket_errors + non2xx,
        error_kinds=kinds,
        rps=(total - non2xx) / elapsed if elapsed > 0 else 0.0,
    )
    return res


@dataclass
class Load:
    """How to drive one measurement."""

    shape: str  # closed | open
    duration: float
    rate: float
    connections: int
    timeout: float
    client_cpus: set[int]
    tmp: Path
    path: str = "/predict"
    body_file: str = "body-small.json"  # in tmp


def wrk_script(tmp: Path, body_file: str) -> Path:
    """A wrk Lua script POSTing the bytes of tmp/body_file (wrk adds the Content-Length)."""
    script = tmp / f"post-{Path(body_file).stem}.lua"
    if not script.exists():
        script.write_text(
            f'local f = assert(io.open({json.dumps(str(tmp / body_file))}, "rb"))\n'
            'wrk.method = "POST"\n'
            'wrk.body = f:read("*a")\n'
            "f:close()\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    return script


def run_load(load: Load, port: int) -> Json:
    def pre() -> None:
        os.sched_setaffinity(0, load.client_cpus)

    if load.shape == "closed":
        script = wrk_script(load.tmp, load.body_file)
        cmd = [
            "wrk",
            "-t1",
            f"-c{load.connections}",
            f"-d{max(1, round(load.duration))}s",
            "--latency",
            f"--timeout={max(1, round(load.timeout))}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{load.path}",
        ]
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=load.duration + load.timeout + 30,
            preexec_fn=pre,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {one_line(out.stderr)}")
        res = parse_wrk(out.stdout, load.duration)
        res["tool"] = f"wrk -t1 -c{load.connections} -d{round(load.duration)}s --latency"
        return res
    cmd = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--port",
        str(port),
        "--rate",
        str(load.rate),
        "--duration",
        str(load.duration),
        "--timeout",
        str(load.timeout),
        "--connections",
        str(load.connections),
        "--path",
        load.path,
        "--body-file",
        str(load.tmp / load.body_file),
    ]
    return _run_loadgen(cmd, pre, load.duration + load.timeout + 30)


def _run_loadgen(cmd: list[str], pre: Callable[[], None], timeout: float) -> Json:
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=pre, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {one_line(out.stderr[-600:])}")
    res: Json = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def sequential(port: int, count: int, timeout: float, client_cpus: set[int]) -> Json:
    cmd = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--port",
        str(port),
        "--sequential",
        str(count),
        "--timeout",
        str(timeout),
    ]
    return _run_loadgen(cmd, lambda: os.sched_setaffinity(0, client_cpus), count * timeout + 30)


def warmup(port: int, client_cpus: set[int], tmp: Path, scenario: Scenario) -> None:
    """50 requests of the scenario's kind, not measured."""
    cmd = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        "--port",
        str(port),
        "--rate",
        "200",
        "--duration",
        "0.25",
        "--timeout",
        "2",
        "--path",
        scenario.path,
        "--body-file",
        str(tmp / scenario.body_file),
    ]
    with contextlib.suppress(Exception):
        _run_loadgen(cmd, lambda: os.sched_setaffinity(0, client_cpus), 30)


# --------------------------------------------------------------------------------------------
# the bench environment


@dataclass
class Env:
    args: argparse.Namespace
    tmp: Path
    echo_module: str
    nginx_bin: str
    proxy_cpus: set[int]
    proxy2_cpus: set[int]
    upstream_cpus: set[int]
    client_cpus: set[int]
    db: Database | None = None
    src: Path = ROOT  # where `python -m shadowproxy` imports from (a snapshot, see snapshot())
    src_sha: str = ""
    primary_port: int = 0
    status_port: int = 0
    shadow_ports: dict[str, int] = field(default_factory=dict)  # by shadow behaviour
    resp8k: str = ""  # body32k's answer
    upstreams: list[Proc] = field(default_factory=list)
    counter: int = 0

    def next_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def start_nginx(self, name: str, conf: Path, port: int, cpus: set[int]) -> Proc:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            d = self.tmp / f"{name}-{sub}"
            d.mkdir(exist_ok=True)
            d.chmod(0o777)
        proc = Proc(
            name,
            [self.nginx_bin, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "x.log")],
            self.tmp / f"{name}.out",
            cpus,
        )
        deadline = time.monotonic() + 10
        while not port_open(port):
            if not proc.alive() or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(
                    f"nginx {name} did not start: {one_line(tail(proc.log_path))} "
                    f"{one_line(tail(self.tmp / f'{name}-error.log'))}"
                )
            time.sleep(0.05)
        return proc

    def start_upstreams(self) -> None:
        self.resp8k = write_bodies(self.tmp)
        resp8k_set, resp8k_value = nginx_split_set("resp8k", self.resp8k)
        self.primary_port = free_port()
        conf = render(
            "primary.conf.tmpl",
            self.tmp / "primary.conf",
            tmp=self.tmp,
            primary_port=self.primary_port,
            resp8k_set=resp8k_set,
            resp8k_value=resp8k_value,
        )
        self.upstreams.append(
            self.start_nginx("primary", conf, self.primary_port, self.upstream_cpus)
        )
        self.shadow_ports = {s: free_port() for s in SHADOWS if s != "refuse"}
        self.shadow_ports["refuse"] = unused_port()
        self.status_port = free_port()
        conf = render(
            "shadows.conf.tmpl",
            self.tmp / "shadows.conf",
            tmp=self.tmp,
            echo_module=self.echo_module,
            status_port=self.status_port,
            hang_s=max(60, round(3 * self.args.shadow_timeout)),
            resp8k_set=resp8k_set,
            resp8k_value=resp8k_value,
            **{f"port_{s}": p for s, p in self.shadow_ports.items() if s != "refuse"},
        )
        self.upstreams.append(
            self.start_nginx("shadows", conf, self.status_port, self.upstream_cpus)
        )
        # sanity: the primary and each shadow answer what they should
        if http_post(f"http://127.0.0.1:{self.primary_port}/predict", BODY) != 200:
            raise RuntimeError("the primary nginx does not answer 200")
        if http_post(f"http://127.0.0.1:{self.shadow_ports['500']}/predict", BODY) != 500:
            raise RuntimeError("the 500 shadow does not answer 500")
        body32k = (self.tmp / SCENARIO_SPECS["body32k"].body_file).read_bytes()
        upload = (self.tmp / SCENARIO_SPECS["upload1m"].body_file).read_bytes()
        for who, port in (
            ("primary", self.primary_port),
            ("fast shadow", self.shadow_ports["fast"]),
        ):
            got = http_post_full(f"http://127.0.0.1:{port}/predict/body32k", body32k)
            if got != (200, self.resp8k.encode()):
                raise RuntimeError(f"the {who} does not answer body32k with the 8 KiB JSON")
            if http_post(f"http://127.0.0.1:{port}/predict/upload1m", upload, 10.0) != 200:
                raise RuntimeError(f"the {who} does not take upload1m's 1 MiB body")
        if port_open(self.shadow_ports["refuse"]):
            raise RuntimeError("the 'refuse' port is taken")

    def upstream_warnings(self) -> list[str]:
        """Signs that an upstream, not the row under test, was the limit."""
        out = []
        for name in ("primary", "shadows"):
            text = ""
            with contextlib.suppress(OSError):
                text = (self.tmp / f"{name}-error.log").read_text(errors="replace")
            for needle in ("worker_connections are not enough", "Too many open files"):
                n = text.count(needle)
                if n:
                    out.append(f"{name} nginx: {n} x '{needle}'")
        return out

    def stop_all(self) -> None:
        for proc in reversed(self.upstreams):
            proc.stop(timeout=5)
        self.upstreams.clear()


@dataclass
class Target:
    """The thing under load for one row: a port, maybe a proxy process."""

    row: str
    port: int
    proc: Proc | None = None
    admin_port: int | None = None
    error: str | None = None


def start_row(env: Env, row: str, scenario: str) -> Target:
    args = env.args
    spec = SCENARIO_SPECS[scenario]
    shadow_port = env.shadow_ports[spec.shadow]
    if row == "direct":
        return Target(row, env.primary_port)
    if row in ("nginx", "nginx-mirror"):
        name = env.next_name(row)
        port = free_port()
        tmpl = "proxy.conf.tmpl" if row == "nginx" else "mirror.conf.tmpl"
        conf = render(
            tmpl,
            env.tmp / f"{name}.conf",
            tmp=env.tmp,
            name=name,
            listen_port=port,
            primary_port=env.primary_port,
            shadow_port=shadow_port,
            shadow_timeout_s=round(args.shadow_timeout),
        )
        return Target(row, port, env.start_nginx(name, conf, port, env.proxy_cpus))
    # shadowproxy-<N>w
    workers = int(row.split("-")[1].rstrip("w"))
    name = env.next_name(row)
    port, admin = free_port(), free_port()
    assert env.db is not None
    cfg = env.tmp / f"{name}.yaml"
    # upload1m: a 1 MiB body must be taken and mirrored (defaults: 10 MiB and exactly 1 MiB)
    server_limit = f", max_body_bytes: {BIG_BODY_LIMIT}" if spec.raise_body_limits else ""
    mirror = [f"    mirror: {{max_body_bytes: {BIG_BODY_LIMIT}}}"] if spec.raise_body_limits else []
    cfg.write_text(
        "\n".join(
            [
                f"# written by bench/run.py for scenario {scenario}",
                "version: 1",
                f"server: {{host: 127.0.0.1, port: {port}{server_limit}}}",
                f"admin: {{host: 127.0.0.1, port: {admin}}}",
                "storage:",
                f"  url: {json.dumps(env.db.url)}",
                f"  spool_dir: {json.dumps(str(env.tmp / (name + '-spool')))}",
                "upstreams:",
                f'  primary: {{url: "http://127.0.0.1:{env.primary_port}", timeout_ms: 5000}}',
                f'  shadow-{spec.shadow}: {{url: "http://127.0.0.1:{shadow_port}", '
                f"timeout_ms: {int(args.shadow_timeout * 1000)}}}",
                "routes:",
                "  - name: predict",
                "    match: {path_prefix: /predict, methods: [POST]}",
                "    primary: primary",
                f"    shadows: [shadow-{spec.shadow}]",
                *mirror,
                "    compare: {label: prediction, score: confidence}",
                "",
            ]
        )
    )
    sp_cmd = args.shadowproxy_cmd or f"{shlex.quote(sys.executable)} -m shadowproxy"
    cmd = [
        *shlex.split(sp_cmd),
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(port),
        "--admin-port",
        str(admin),
        "--workers",
        str(workers),
        "--database-url",
        env.db.url,
    ]
    run_env = dict(os.environ)
    if not args.shadowproxy_cmd:
        run_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(env.src), run_env.get("PYTHONPATH")])
        )
    run_env.pop("SHADOWPROXY_CONFIG", None)
    run_env.pop("SHADOWPROXY_DATABASE_URL", None)
    cpus = env.proxy_cpus if workers == 1 else env.proxy2_cpus
    proc = Proc(name, cmd, env.tmp / f"{name}.log", cpus, cwd=env.tmp, env=run_env)
    target = Target(row, port, proc, admin)
    deadline = time.monotonic() + args.ready_timeout
    why = "no answer"
    while True:
        if not proc.alive():
            rc = proc.popen.returncode
            proc.stop()
            raise RuntimeError(f"exited {rc} before ready: {one_line(tail(proc.log_path, 6))}")
        try:
            status, _ = http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1.0)
            if status == 200 and http_post(f"http://127.0.0.1:{port}/predict", BODY) == 200:
                break
            why = f"/readyz {status}"
        except OSError as exc:
            why = str(exc)
        if time.monotonic() > deadline:
            stop_row(target)
            raise RuntimeError(
                f"not ready after {args.ready_timeout:.0f}s ({why}): "
                f"{one_line(tail(proc.log_path, 6))}"
            )
        time.sleep(0.2)
    return target


def stop_row(target: Target) -> None:
    if target.proc is not None:
        rc = target.proc.stop(timeout=20)
        if target.row.startswith("shadowproxy") and rc not in (0, None):
            log(f"{target.proc.name} exited {rc} on SIGTERM (expected 0)")


def _delta(after: float | int | None, before: float | int | None) -> float | None:
    if after is None:
        return None
    return float(after) - float(before or 0)


def _accounted(c: dict[str, float | None], base: dict[str, float | None]) -> bool:
    """Since `base`: every served request mirrored or shed, every mirrored pair counted as a
    record (written, spooled or dropped)."""

    def d(key: str) -> float:
        return _delta(c.get(key), base.get(key)) or 0.0

    records = d("records_written") + d("records_spooled") + d("records_dropped")
    return d("served") == d("mirrored") + d("shed") and records == d("mirrored")


def settle_shadowproxy(
    target: Target,
    timeout: float,
    base: dict[str, float | None] | None = None,
    drain_extra: float = 120.0,
) -> None:
    """Wait until mirrors and the record queue have drained and the counters stand still, and
    (given the counters at the start, `base`) every pair since is accounted for: the writer
    takes a batch off the queue before it writes it, so an empty queue is not enough.
    Bounded by `timeout`; while the counters still move (a record backlog for PostgreSQL, as
    with body32k's 48 KiB rows) the wait goes on, up to `drain_extra` seconds longer."""
    assert target.admin_port is not None
    deadline = time.monotonic() + timeout
    cap = deadline + drain_extra
    last: tuple[float | None, ...] = ()
    stable = 0
    while time.monotonic() < deadline:
        try:
            c = sp_counters(target.admin_port)
        except (OSError, RuntimeError):
            time.sleep(0.25)
            continue
        now = (
            c["mirrored"],
            c["records_written"],
            c["records_spooled"],
            c["records_dropped"],
            c["shed"],
            c["queue_depth"],
        )
        drained = not c["queue_depth"] and not c["in_flight"]
        if base is not None:
            drained = drained and _accounted(c, base)
        if now == last:
            stable += 1
        else:
            if last:  # progress: give it a few more seconds, within the cap
                deadline = min(cap, max(deadline, time.monotonic() + 5.0))
            stable = 0
        last = now
        if drained and stable >= 2:
            return
        time.sleep(0.25)
    if last:
        keys = ("served", "mirrored", "shed", "records_written", "records_spooled")
        counts = ", ".join(
            f"{k} {_delta(c.get(k), (base or {}).get(k)) or 0:,.0f}"
            for k in (*keys, "records_dropped")
        )
        log(
            f"{target.row}: not settled after {timeout:g}s (+ up to {drain_extra:g}s while "
            f"moving): queue {fmt_n(c['queue_depth'])}, in flight {fmt_n(c['in_flight'])}"
            + (f"; since start: {counts}" if base is not None else "")
        )


def measure(env: Env, target: Target, load: Load) -> Json:
    res: Json = {}
    sp = target.admin_port is not None
    reach0 = stub_requests(env.status_port)
    sp0 = sp_counters(target.admin_port) if target.admin_port else {}
    db0 = env.db.rows() if sp and env.db else None
    with TreeSampler(target.proc) as sampler:
        res.update(run_load(load, target.port))
        if sp:
            settle_shadowproxy(target, env.args.shadow_timeout + 3.0, sp0)
        elif target.row == "nginx-mirror":
            time.sleep(0.5)
    reach1 = stub_requests(env.status_port)
    res["reached_shadow"] = (
        max(0, reach1 - reach0 - 1) if reach0 is not None and reach1 is not None else None
    )
    cpu = sampler.cpu_seconds()
    res["proxy_cpu_s"] = cpu
    res["cpu_us_per_req"] = cpu / res["ok"] * 1e6 if cpu is not None and res.get("ok") else None
    res["rss_max_mb"] = sampler.rss_max / 2**20 if target.proc is not None else None
    if sp and target.admin_port:
        sp1 = sp_counters(target.admin_port)
        for key in SP_COUNTERS:
            res[key] = _delta(sp1.get(key), sp0.get(key))
        res["queue_depth_end"] = sp1.get("queue_depth")
        res["in_flight_end"] = sp1.get("in_flight")
        db1 = env.db.rows() if env.db else None
        res["db_rows"] = _delta(db1, db0) if db1 is not None else None
    elif target.row == "nginx-mirror":
        res["mirrored"] = res["reached_shadow"]
    return res


# --------------------------------------------------------------------------------------------
# reporting

NUMERIC_KEYS = [
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "errors",
    "ok",
    "reached_shadow",
    "mirrored",
    "served",
    "shed",
    "records_written",
    "records_spooled",
    "records_dropped",
    "db_rows",
    "cpu_us_per_req",
    "rss_max_mb",
]


def medians(runs: list[Json]) -> dict[tuple[str, str, str], Json]:
    groups: dict[tuple[str, str, str], list[Json]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["row"], r["shape"]), []).append(r)
    out: dict[tuple[str, str, str], Json] = {}
    for key, items in groups.items():
        good = [r for r in items if not r.get("error")]
        med: Json = {"runs": len(items), "ok_runs": len(good)}
        if not good:
            med["error"] = items[-1].get("error")
        for k in NUMERIC_KEYS:
            vals = [r[k] for r in good if r.get(k) is not None]
            med[k] = statistics.median(vals) if vals else None
        if len(good) < len(items):
            med["failed_runs"] = [r.get("error") for r in items if r.get("error")]
        out[key] = med
    return out


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def fmt_n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def fmt_delta(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def scenario_rate(args: argparse.Namespace, scenario: str) -> float:
    """The open-loop rate of a scenario (the body scenarios have their own)."""
    return float(
        {"body32k": args.rate_body32k, "upload1m": args.rate_upload1m}.get(scenario, args.rate)
    )


def scenario_duration(args: argparse.Namespace, scenario: str) -> float:
    if args.quick and not args.duration_given and scenario in QUICK_DURATION:
        return QUICK_DURATION[scenario]
    return float(args.duration)


def rows_for(args: argparse.Namespace, scenario: str) -> list[str]:
    rows: list[str] = args.rows
    if args.quick and not args.rows_given and scenario in QUICK_ROWS:
        rows = [r for r in rows if r in QUICK_ROWS[scenario]]
    return rows


def _but(args: argparse.Namespace, value: Callable[[str], str]) -> str:
    """' (scenario X, ...)' for the scenarios whose setting differs from the default one."""
    default = value("fast")
    others = [f"{s} {value(s)}" for s in args.scenarios if value(s) != default]
    return f" ({', '.join(others)})" if others else ""


def tables(med: dict[tuple[str, str, str], Json], args: argparse.Namespace) -> str:
    out: list[str] = []
    for shape in args.shapes:
        if shape == "closed":
            out.append(
                f"### Closed loop: wrk -t1 -c{args.connections} -d{round(args.duration)}s"
                + _but(args, lambda s: f"-d{round(scenario_duration(args, s))}s")
                + f" --latency (medians of {args.repeat})\n"
            )
            head = [
                "scenario",
                "row",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "errors",
                "reached shadow",
                "mirrored",
                "shed",
                "records",
                "db rows",
                "CPU µs/req",
                "RSS MB",
                "req/s ÷ direct",
                "req/s ÷ nginx-mirror",
            ]
        else:
            out.append(
                f"### Open loop: {args.rate:g} req/s"
                + _but(args, lambda s: f"{scenario_rate(args, s):g} req/s")
                + f" for {args.duration:g}s"
                + _but(args, lambda s: f"{scenario_duration(args, s):g}s")
                + f", latency from the scheduled send time (medians of {args.repeat})\n"
            )
            head = [
                "scenario",
                "row",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "errors",
                "reached shadow",
                "mirrored",
                "shed",
                "records",
                "db rows",
                "CPU µs/req",
                "RSS MB",
                "p50 - direct ms",
                "p99 - direct ms",
                "p99 ÷ nginx-mirror",
            ]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
        for scenario in args.scenarios:
            direct = med.get((scenario, "direct", shape), {})
            mirror = med.get((scenario, "nginx-mirror", shape), {})
            for row in rows_for(args, scenario):
                m = med.get((scenario, row, shape))
                if m is None:
                    continue
                if m.get("error"):
                    cells = [scenario, row, "ERROR: " + one_line(str(m["error"]), 200)]
                    cells += ["-"] * (len(head) - len(cells))
                    out.append("| " + " | ".join(cells) + " |")
                    continue
                rec_s = fmt_n(m.get("records_written"))
                extra = [
                    f"{word}{fmt_n(m[key])} {key.split('_')[1]}"
                    for word, key in (("+", "records_spooled"), ("", "records_dropped"))
                    if m.get(key)
                ]
                if extra:
                    rec_s += f" ({', '.join(extra)})"
                cells = [
                    scenario,
                    row,
                    fmt_n(m["rps"]),
                    fmt_ms(m["p50_ms"]),
                    fmt_ms(m["p90_ms"]),
                    fmt_ms(m["p99_ms"]),
                    fmt_ms(m["max_ms"]),
                    fmt_n(m["errors"]),
                    fmt_n(m["reached_shadow"]) if row not in ("direct", "nginx") else "-",
                    fmt_n(m["mirrored"]),
                    fmt_n(m["shed"]),
                    rec_s,
                    fmt_n(m["db_rows"]),
                    fmt_n(m["cpu_us_per_req"]),
                    "-" if m["rss_max_mb"] is None else f"{m['rss_max_mb']:.1f}",
                ]
                if shape == "closed":
                    cells += [
                        fmt_ratio(_ratio(m["rps"], direct.get("rps"))),
                        fmt_ratio(_ratio(m["rps"], mirror.get("rps"))),
                    ]
                else:
                    cells += [
                        fmt_delta(_sub(m["p50_ms"], direct.get("p50_ms"))),
                        fmt_delta(_sub(m["p99_ms"], direct.get("p99_ms"))),
                        fmt_ratio(_ratio(m["p99_ms"], mirror.get("p99_ms"))),
                    ]
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def keepalive_table(ka: dict[str, Json], count: int) -> str:
    lines = [
        f"### Keep-alive: {count} sequential requests on one connection, shadow answers in 2 s\n",
        "| row | total s | p50 ms | p99 ms | max ms | errors | reconnects |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in ka.items():
        if r.get("error"):
            lines.append(f"| {row} | ERROR: {one_line(str(r['error']), 200)} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row} | {r['total_s']:.2f} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} | "
            f"{fmt_ms(r['max_ms'])} | {r['errors']} | {r['reconnects']} |"
        )
    return "\n".join(lines) + "\n"


def rss_table(rss: Json) -> str:
    lines = [
        f"### Memory: shadowproxy-1w, hanging shadow, open loop {rss.get('rate', 0):g} req/s "
        f"for {rss.get('seconds', 0):g}s (RSS of the process tree, sampled every second)\n",
        "| start MB | max MB | end MB | max of 2nd half ÷ max of 1st half | "
        "requests ok | errors | reached shadow | mirrored | shed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if rss.get("error"):
        lines.append(f"| ERROR: {one_line(str(rss['error']), 200)} |" + " - |" * 8)
    else:
        lines.append(
            f"| {rss['start_mb']:.1f} | {rss['max_mb']:.1f} | {rss['end_mb']:.1f} | "
            f"{fmt_ratio(rss.get('growth_2nd_half'))} | {fmt_n(rss.get('ok'))} | "
            f"{fmt_n(rss.get('errors'))} | {fmt_n(rss.get('reached_shadow'))} | "
            f"{fmt_n(rss.get('mirrored'))} | {fmt_n(rss.get('shed'))} |"
        )
    return "\n".join(lines) + "\n"


def target_checks(
    med: dict[tuple[str, str, str], Json],
    runs: list[Json],
    rss: Json | None,
    args: argparse.Namespace,
) -> list[str]:
    """Issue #13's targets, stated as MET / MISSED with the measured numbers. Ratios and
    latencies are checked on the medians; the counting checks on every single run (the
    medians of different columns come from different runs)."""
    lines: list[str] = []
    one, two = "shadowproxy-1w", "shadowproxy-2w"

    def get(s: str, row: str, shape: str) -> Json:
        m = med.get((s, row, shape)) or {}
        return {} if m.get("error") else m

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("MET" if ok else "MISSED")

    def each(s: str, row: str) -> list[Json]:
        return [
            r
            for r in runs
            if (r["scenario"], r["row"]) == (s, row)
            and not r.get("error")
            and r.get("served") is not None
        ]

    def open_overhead(s: str, with_p50: bool) -> None:
        sp, d = get(s, one, "open"), get(s, "direct", "open")
        if sp.get("p99_ms") is None or d.get("p99_ms") is None:
            return
        parts, oks = [], []
        if with_p50:
            d50 = sp["p50_ms"] - d["p50_ms"]
            parts.append(f"p50 {d50:+.2f} ms (≤ +1)")
            oks.append(d50 <= 1.0)
        d99 = sp["p99_ms"] - d["p99_ms"]
        parts.append(f"p99 {d99:+.2f} ms (≤ +5)")
        oks.append(d99 <= 5.0)
        lines.append(
            f"- open loop, {s} ({one}, {scenario_rate(args, s):g} req/s): "
            f"{'; '.join(parts)} vs direct {verdict(all(oks))}"
        )

    def vs_mirror(s: str, row: str, floor: float, cpu_max: float | None = None) -> None:
        sp, nm = get(s, row, "closed"), get(s, "nginx-mirror", "closed")
        if not sp.get("rps") or not nm.get("rps"):
            return
        r = sp["rps"] / nm["rps"]
        text = (
            f"- closed loop, {s} ({row}): {sp['rps']:,.0f} req/s = {r:.2f} x nginx-mirror's "
            f"{nm['rps']:,.0f} (≥ {floor:.2f})"
        )
        ok = r >= floor
        if cpu_max is not None:
            c = sp.get("cpu_us_per_req")
            text += f", {fmt_n(c)} µs CPU per request (≤ {cpu_max:.0f})"
            ok = ok and c is not None and c <= cpu_max
        lines.append(f"{text} {verdict(ok)}")

    def accounted(row: str, scenarios: Sequence[str], allow_dropped: bool, label: str) -> None:
        """served = mirrored + shed; pairs (= mirrored) = written + spooled (+ dropped);
        db rows = written; nothing left in flight or queued; in every run."""
        checked = [(s, r) for s in scenarios for r in each(s, row)]
        if not checked:
            return
        keys = ("served", "mirrored", "shed", "records_written", "records_spooled")
        tot = dict.fromkeys((*keys, "records_dropped", "db_rows"), 0.0)
        bad: list[str] = []
        for s, r in checked:
            v = {k: r.get(k) or 0.0 for k in (*keys, "records_dropped")}
            for k in tot:
                tot[k] += r.get(k) or 0.0
            records = v["records_written"] + v["records_spooled"]
            if allow_dropped:
                records += v["records_dropped"]
            problems = []
            if v["mirrored"] + v["shed"] != v["served"]:
                problems.append(
                    f"served {v['served']:,.0f} ≠ mirrored {v['mirrored']:,.0f} + shed "
                    f"{v['shed']:,.0f}"
                )
            if records != v["mirrored"]:
                problems.append(
                    f"pairs {v['mirrored']:,.0f} ≠ records {records:,.0f} (written "
                    f"{v['records_written']:,.0f}, spooled {v['records_spooled']:,.0f}, dropped "
                    f"{v['records_dropped']:,.0f})"
                )
            if r.get("db_rows") is not None and r["db_rows"] != v["records_written"]:
                problems.append(
                    f"db rows {r['db_rows']:,.0f} ≠ written {v['records_written']:,.0f}"
                )
            if r.get("queue_depth_end") or r.get("in_flight_end"):
                problems.append(
                    f"still queued {fmt_n(r.get('queue_depth_end'))}, in flight "
                    f"{fmt_n(r.get('in_flight_end'))}"
                )
            if problems:
                bad.append(f"{s}/{r['shape']} rep {r['repeat']}: {', '.join(problems)}")
        shown = f"; first failing run: {bad[0]}" if bad else ""
        ran = [s for s in scenarios if any(c[0] == s for c in checked)]
        lines.append(
            f"- {label} ({row}, {len(checked)} runs of {', '.join(ran)}; totals: served "
            f"{tot['served']:,.0f} = mirrored {tot['mirrored']:,.0f} + shed {tot['shed']:,.0f}; "
            f"pairs = written {tot['records_written']:,.0f} + spooled "
            f"{tot['records_spooled']:,.0f} + dropped {tot['records_dropped']:,.0f}; db rows "
            f"{tot['db_rows']:,.0f}){shown} {verdict(not bad)}"
        )

    # latency at a fixed rate, a fast and a hanging shadow
    for s in ("fast", "hang"):
        open_overhead(s, with_p50=True)
    # throughput and CPU, fast shadow
    vs_mirror("fast", one, 0.35, cpu_max=300)
    vs_mirror("fast", two, 0.60)
    # bad shadows cost no throughput
    for row in (one, two):
        base = get("fast", row, "closed")
        for s in ("2s", "hang", "refuse", "500"):
            c = get(s, row, "closed")
            if c.get("rps") and base.get("rps"):
                r = c["rps"] / base["rps"]
                lines.append(
                    f"- closed loop, {s} shadow ({row}): {c['rps']:,.0f} req/s = {r:.2f} x its "
                    f"fast-shadow {base['rps']:,.0f} (≥ 0.90) {verdict(r >= 0.9)}"
                )
    # model-sized bodies, PostgreSQL recording on, fast shadow
    vs_mirror("body32k", one, 0.40)
    vs_mirror("upload1m", one, 0.50)
    for s in ("body32k", "upload1m"):
        open_overhead(s, with_p50=False)
    for row in (one, two):
        for s in ("body32k", "upload1m"):
            accounted(row, [s], True, "every pair recorded or accounted")
    # no record lost
    for row in (one, two):
        accounted(row, SHADOWS, False, "no record lost")
    if rss and not rss.get("error"):
        g = rss.get("growth_2nd_half")
        lines.append(
            f"- memory (hanging shadow, {rss['seconds']:g}s): RSS start {rss['start_mb']:.1f} MB, "
            f"max {rss['max_mb']:.1f} MB, end {rss['end_mb']:.1f} MB; 2nd-half max ÷ 1st-half "
            f"max {fmt_ratio(g)} (flat: ≤ 1.10) {verdict(None if g is None else g <= 1.10)}"
        )
    return lines


# --------------------------------------------------------------------------------------------
# machine facts


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "n/a"


def _cmd_out(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout + out.stderr).strip()
    except OSError:
        return "n/a"


def machine_facts(db: Database | None) -> Json:
    model = "n/a"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "n/a"
    with contextlib.suppress(OSError, IndexError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    git = _cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--", "shadowproxy"])
    pg = "n/a"
    if db is not None:
        with contextlib.suppress(Exception):
            pg = db.version()
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "os": _cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "orjson": _version("orjson"),
        "asyncpg": _version("asyncpg"),
        "shadowproxy": _version("shadowproxy"),
        "git_commit": git + (" (shadowproxy/ modified)" if dirty else ""),
        "nginx": _cmd_out(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "wrk": _cmd_out(["wrk", "-v"]).splitlines()[0] if shutil.which("wrk") else "n/a",
        "postgresql": pg,
    }


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="≈1 minute smoke run")
    ap.add_argument("--scenarios", help=f"comma list of {','.join(SCENARIOS)}")
    ap.add_argument("--rows", help=f"comma list of {','.join(ROWS)}")
    ap.add_argument("--shapes", help="comma list of closed,open")
    ap.add_argument("--repeat", type=int, help="runs per row; medians are quoted (default 3)")
    ap.add_argument("--duration", type=float, help="seconds per load run (default 10)")
    ap.add_argument("--rate", type=float, default=500.0, help="open-loop req/s (default 500)")
    ap.add_argument(
        "--rate-body32k", type=float, default=1000.0, help="body32k open-loop req/s (1000)"
    )
    ap.add_argument(
        "--rate-upload1m", type=float, default=150.0, help="upload1m open-loop req/s (150)"
    )
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument(
        "--open-connections", type=int, default=64, help="open-loop max connections (default 64)"
    )
    ap.add_argument("--timeout", type=float, default=5.0, help="client timeout per request")
    ap.add_argument(
        "--shadow-timeout",
        type=float,
        default=10.0,
        help="shadow timeout, nginx mirror and shadowproxy alike (default 10 s)",
    )
    ap.add_argument("--keepalive-requests", type=int, help="keep-alive test length (default 50)")
    ap.add_argument(
        "--rss-seconds", type=float, help="RSS run against a hanging shadow (default 60; 0: skip)"
    )
    ap.add_argument("--out", default=str(BENCH / "results"), help="directory for the JSON")
    ap.add_argument("--results-md", help="also write this markdown file (bench/RESULTS.md)")
    ap.add_argument(
        "--shadowproxy-cmd",
        help="command that runs the shadowproxy CLI (default: this Python -m shadowproxy, "
        "from a snapshot of ./shadowproxy taken at start)",
    )
    ap.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL maintenance URL; a throw-away database is created next to it",
    )
    ap.add_argument("--ready-timeout", type=float, default=30.0)
    ap.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run shadowproxy from the working tree (default: from a copy taken at start)",
    )
    ncpu = len(os.sched_getaffinity(0))
    ap.add_argument("--proxy-cpus", default="0", help="CPUs of the proxy under test (1 worker)")
    ap.add_argument(
        "--proxy2-cpus", default="0,1" if ncpu > 1 else "0", help="CPUs of shadowproxy-2w"
    )
    ap.add_argument("--upstream-cpus", default="0", help="CPUs of the upstream nginx servers")
    ap.add_argument(
        "--client-cpus", default="1" if ncpu > 1 else "0", help="CPUs of wrk / loadgen / harness"
    )
    args = ap.parse_args(argv)
    args.scenarios = (
        args.scenarios.split(",")
        if args.scenarios
        else (QUICK_SCENARIOS if args.quick else SCENARIOS)
    )
    args.rows_given = bool(args.rows)
    args.rows = args.rows.split(",") if args.rows else list(ROWS)
    args.shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    for name, values, allowed in (
        ("--scenarios", args.scenarios, SCENARIOS),
        ("--rows", args.rows, ROWS),
        ("--shapes", args.shapes, SHAPES),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{name}: unknown {bad}; choose from {allowed}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.duration_given = args.duration is not None
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.keepalive_requests is None:
        args.keepalive_requests = 5 if args.quick else 50
    if args.rss_seconds is None:
        args.rss_seconds = 0.0 if args.quick else 60.0
    return args


def run_keepalive(env: Env) -> dict[str, Json]:
    args = env.args
    out: dict[str, Json] = {}
    rows = [r for r in ("nginx-mirror", "shadowproxy-1w") if r in args.rows]
    for row in rows:
        log(f"keep-alive test: {row}, {args.keepalive_requests} requests, 2 s shadow")
        target: Target | None = None
        try:
            target = start_row(env, row, "2s")
            out[row] = sequential(target.port, args.keepalive_requests, 15.0, env.client_cpus)
        except Exception as exc:
            out[row] = {"error": str(exc)}
        finally:
            if target is not None:
                stop_row(target)
    return out


def run_rss(env: Env) -> Json:
    args = env.args
    log(f"RSS run: shadowproxy-1w, hanging shadow, {args.rate:g} req/s for {args.rss_seconds:g}s")
    target: Target | None = None
    try:
        target = start_row(env, "shadowproxy-1w", "hang")
        load = Load(
            "open",
            args.rss_seconds,
            args.rate,
            args.open_connections,
            args.timeout,
            env.client_cpus,
            env.tmp,
        )
        assert target.admin_port is not None
        before = sp_counters(target.admin_port)
        reach0 = stub_requests(env.status_port)
        with TreeSampler(target.proc, interval=1.0) as sampler:
            res = run_load(load, target.port)
        after = sp_counters(target.admin_port)
        reach1 = stub_requests(env.status_port)
        series = [(round(t, 1), round(b / 2**20, 1)) for t, b in sampler.rss_series]
        mbs = [mb for _, mb in series]
        half = len(mbs) // 2
        first, second = max(mbs[: half or 1]), max(mbs[half:] or mbs)
        return {
            "rate": args.rate,
            "seconds": args.rss_seconds,
            "start_mb": mbs[0],
            "max_mb": max(mbs),
            "end_mb": mbs[-1],
            "growth_2nd_half": second / first if first else None,
            "series_mb": series,
            "ok": res.get("ok"),
            "errors": res.get("errors"),
            "p99_ms": res.get("p99_ms"),
            "mirrored": _delta(after.get("mirrored"), before.get("mirrored")),
            "shed": _delta(after.get("shed"), before.get("shed")),
            "reached_shadow": reach1 - reach0 - 1
            if reach0 is not None and reach1 is not None
            else None,
        }
    except Exception as exc:
        return {"rate": args.rate, "seconds": args.rss_seconds, "error": str(exc)}
    finally:
        if target is not None:
            stop_row(target)
        if env.db is not None:
            env.db.truncate()


def snapshot(dest: Path) -> str:
    """Copy shadowproxy/ so that every row of this run runs the same code, even while the
    working tree is being edited; returns a short hash of the copied tree."""
    import hashlib

    shutil.copytree(
        ROOT / "shadowproxy", dest / "shadowproxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    digest = hashlib.sha256()
    for path in sorted((dest / "shadowproxy").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def check_tools() -> tuple[str, str]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    missing = []
    if not nginx:
        missing.append("nginx")
    if not shutil.which("wrk"):
        missing.append("wrk")
    echo = next((p for p in ECHO_MODULE_CANDIDATES if Path(p).exists()), "")
    if not echo:
        missing.append("libnginx-mod-http-echo")
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)}: "
            "apt-get install -y nginx libnginx-mod-http-echo wrk (or `make bench`, which does)"
        )
    return nginx, echo


@contextlib.contextmanager
def bench_env(args: argparse.Namespace) -> Iterator[Env]:
    nginx, echo = check_tools()
    tmp = Path(tempfile.mkdtemp(prefix="shadowproxy-bench-"))
    tmp.chmod(0o755)
    env = Env(
        args=args,
        tmp=tmp,
        echo_module=echo,
        nginx_bin=nginx,
        proxy_cpus=parse_cpus(args.proxy_cpus),
        proxy2_cpus=parse_cpus(args.proxy2_cpus),
        upstream_cpus=parse_cpus(args.upstream_cpus),
        client_cpus=parse_cpus(args.client_cpus),
    )
    os.sched_setaffinity(0, env.client_cpus)
    try:
        if not args.shadowproxy_cmd and not args.no_snapshot and (ROOT / "shadowproxy").is_dir():
            env.src = tmp / "src"
            env.src_sha = snapshot(env.src)
        if any(r.startswith("shadowproxy") for r in args.rows):
            env.db = Database(args.pg_url)
            try:
                env.db.create()
            except Exception as exc:
                log(f"cannot create the throw-away database: {exc}")
                env.db = None
        env.start_upstreams()
        yield env
    finally:
        env.stop_all()
        if env.db is not None:
            try:
                env.db.drop()
            except Exception as exc:
                log(f"could not drop database {env.db.name}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/run.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    started = dt.datetime.now(dt.UTC)
    runs: list[Json] = []
    keepalive: dict[str, Json] = {}
    rss: Json | None = None
    with bench_env(args) as env:
        facts = machine_facts(env.db)
        facts["shadowproxy_tree_sha256"] = env.src_sha or (
            "n/a (--shadowproxy-cmd)" if args.shadowproxy_cmd else "working tree"
        )
        facts["shadowproxy_cmd"] = args.shadowproxy_cmd or "python -m shadowproxy (snapshot)"
        log(
            f"tmp {env.tmp}; scenarios {args.scenarios}; rows {args.rows}; shapes {args.shapes}; "
            f"repeat {args.repeat}; {args.duration:g}s per run"
        )
        if args.keepalive_requests > 0:  # first, while the shadow nginx is fresh
            keepalive = run_keepalive(env)
        for rep in range(args.repeat):
            for scenario in args.scenarios:
                spec = SCENARIO_SPECS[scenario]
                for row in rows_for(args, scenario):
                    base = {"repeat": rep, "scenario": scenario, "row": row}
                    target: Target | None = None
                    try:
                        if row.startswith("shadowproxy") and env.db is None:
                            raise RuntimeError("no PostgreSQL database for the records")
                        target = start_row(env, row, scenario)
                        warmup(target.port, env.client_cpus, env.tmp, spec)
                        if target.admin_port is not None:  # let the warm-up's records land
                            # (accounted since the start: the readiness POSTs count too)
                            settle_shadowproxy(target, args.shadow_timeout + 3.0, {})
                    except Exception as exc:
                        log(f"{scenario}/{row}: cannot start: {exc}")
                        for shape in args.shapes:
                            runs.append({**base, "shape": shape, "error": str(exc)})
                        continue
                    try:
                        for shape in args.shapes:
                            load = Load(
                                shape,
                                scenario_duration(args, scenario),
                                scenario_rate(args, scenario),
                                args.connections if shape == "closed" else args.open_connections,
                                args.timeout,
                                env.client_cpus,
                                env.tmp,
                                spec.path,
                                spec.body_file,
                            )
                            try:
                                res = measure(env, target, load)
                                log(
                                    f"rep {rep} {scenario:8} {row:15} {shape:6} "
                                    f"{res.get('rps', 0):9,.0f} req/s  p50 {fmt_ms(res.get('p50_ms'))}"
                                    f"  p99 {fmt_ms(res.get('p99_ms'))}  errors {res.get('errors')}"
                                )
                                runs.append({**base, "shape": shape, **res})
                            except Exception as exc:
                                log(f"{scenario}/{row}/{shape}: {exc}")
                                runs.append({**base, "shape": shape, "error": str(exc)})
                    finally:
                        stop_row(target)
                        if row.startswith("shadowproxy") and env.db is not None:
                            env.db.truncate()
        if args.rss_seconds > 0 and "shadowproxy-1w" in args.rows and env.db is not None:
            rss = run_rss(env)
        warnings = env.upstream_warnings()
    finished = dt.datetime.now(dt.UTC)
    med = medians(runs)
    md = [tables(med, args)]
    if keepalive:
        md.append(keepalive_table(keepalive, args.keepalive_requests))
    if rss:
        md.append(rss_table(rss))
    checks = target_checks(med, runs, rss, args)
    if checks:
        md.append(
            "### Targets (issue #13): ratios and latencies from the medians above, counts per "
            "run\n\n" + "\n".join(checks) + "\n"
        )
    code = (
        f"run as `{args.shadowproxy_cmd}`"
        if args.shadowproxy_cmd
        else f"tree {facts['shadowproxy_tree_sha256']}"
    )
    facts_line = (
        f"Machine: {facts['nproc']} CPUs ({facts['cpu_model']}), Python {facts['python']}, "
        f"aiohttp {facts['aiohttp']}, uvloop {facts['uvloop']}, nginx {facts['nginx']}, "
        f"PostgreSQL {facts['postgresql']}, shadowproxy {facts['shadowproxy']} "
        f"@ {facts['git_commit']} ({code}); load average at start "
        f"{' '.join(facts['loadavg_at_start'])}. "
        f"Pinning: proxy CPU {args.proxy_cpus} (2 workers: {args.proxy2_cpus}), upstreams CPU "
        f"{args.upstream_cpus}, load generators CPU {args.client_cpus}."
    )
    if warnings:
        md.append(
            "### Warnings\n\n"
            + "\n".join(f"- {w} (an upstream was the limit; numbers are suspect)" for w in warnings)
            + "\n"
        )
    report = "\n".join(md) + "\n" + facts_line + "\n"
    print(report)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench-{'quick-' if args.quick else ''}{stamp}.json"
    payload = {
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "command": command,
        "machine": facts,
        "settings": {
            k: v for k, v in vars(args).items() if not k.startswith("_") and k != "results_md"
        },
        "medians": [
            {"scenario": k[0], "row": k[1], "shape": k[2], **v} for k, v in sorted(med.items())
        ],
        "runs": runs,
        "keepalive": keepalive,
        "rss": rss,
        "targets": checks,
        "warnings": warnings,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {path}")
    if args.results_md:
        md_path = Path(args.results_md)
        md_path.write_text(
            "# Benchmark results (latest full run)\n\n"
            f"Date: {started.strftime('%Y-%m-%d %H:%M UTC')} "
            f"(took {(finished - started).total_seconds() / 60:.0f} min)  \n"
            f"Command: `{command}` (via `make bench`)  \n"
            f"Raw data: `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`\n\n"
            "What each row and column means: bench/README.md.\n\n" + report
        )
        log(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
