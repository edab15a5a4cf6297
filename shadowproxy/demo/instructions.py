"""What the demo prints once traffic has flowed: a summary and the commands to try next."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from shadowproxy.demo.records import Summary
from shadowproxy.demo.routes import ROUTE, DemoRoutes


def print_summary(summary: Summary, sent: int) -> None:
    if summary.rows == 0:
        print(f"no records yet for the {sent} requests (the proxy may still be writing them)")
        return
    comparable = summary.agreed + summary.disagreed
    rate = f"{summary.agreed / comparable:.1%}" if comparable else "n/a"
    print(
        f"recorded {summary.rows} pairs: agreement {rate} "
        f"({summary.agreed} agree, {summary.disagreed} disagree, "
        f"{summary.not_comparable} not comparable)"
    )
    if summary.primary_p50_ms is not None and summary.shadow_p50_ms is not None:
        print(
            f"median latency: primary {summary.primary_p50_ms:.1f} ms, "
            f"shadow {summary.shadow_p50_ms:.1f} ms"
        )


def print_instructions(routes: DemoRoutes, token: str, *, token_from_env: bool) -> None:
    cli = cli_name()
    config = shlex.quote(_shown(routes.path))
    database = shlex.quote(_shown(routes.database))
    body = '{"instances": [[6.1, 2.8, 4.8, 1.8]]}'
    select = (
        "SELECT request_id, primary_label, shadow_label, agreement, "
        "round(primary_latency_ms, 1) AS primary_ms, round(shadow_latency_ms, 1) AS shadow_ms "
        "FROM shadow_log ORDER BY id DESC LIMIT 10"
    )
    disagreements = (
        "SELECT primary_label, shadow_label, count(*) FROM shadow_log "
        "WHERE agreement = 0 GROUP BY 1, 2 ORDER BY 3 DESC"
    )
    admin = f"http://127.0.0.1:{routes.admin_port}"
    token_line = "" if token_from_env else f"export SHADOWPROXY_ADMIN_TOKEN={token}\n  "
    print(
        f"""
Send traffic (the answer is the primary's; the candidate runs in its shadow):
  curl -s -X POST http://127.0.0.1:{routes.port}/predict \\
       -H 'Content-Type: application/json' -d '{body}'

Read the promotion report:
  {cli} report --config {config}
  {cli} report --config {config} --format html --output report.html

See the records (SQLite, table shadow_log):
  sqlite3 {database} '{select}'
  sqlite3 {database} '{disagreements}'

Metrics and admin:
  curl -s {admin}/metrics | grep shadowproxy_agreement_ratio
  {token_line}{cli} promote {ROUTE} --config {config} --admin-url {admin}
""",
        flush=True,
    )


def cli_name() -> str:
    """How this user runs the console script: ``shadowproxy`` if on PATH, else its path."""
    script = Path(sys.executable).with_name("shadowproxy")
    found = shutil.which("shadowproxy")
    if found and Path(found).resolve() == script.resolve():
        return "shadowproxy"
    if script.exists():
        return shlex.quote(_shown(script))
    return f"{shlex.quote(sys.executable)} -m shadowproxy"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
