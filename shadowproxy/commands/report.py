"""`shadowproxy report` and the gate behind `promote --if-ready`.

Exit codes: 0 every entry ready; 1 some entry not ready; 3 some entry has too few
samples (3 wins over 1: nothing is decided on too little evidence); 2 usage error.
An entry is one (route, shadow). Without ``--route`` every route of the config is
reported; without ``--shadow`` a route's shadows are its configured ones plus any
other seen in its records in the window (former shadows, ``replay --name`` labels).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import replace

from shadowproxy.base.errors import ConfigError, StorageError, UsageError
from shadowproxy.base.exits import EXIT_INSUFFICIENT, EXIT_NOT_READY, EXIT_READY, EXIT_USAGE
from shadowproxy.config.durations import parse_duration
from shadowproxy.config.load import load_settings
from shadowproxy.config.settings import RouteSettings, Settings
from shadowproxy.report.gates import judge
from shadowproxy.report.model import INSUFFICIENT, NOT_READY, Report, RouteReport
from shadowproxy.report.render_json import render_json
from shadowproxy.report.render_markdown import render_markdown
from shadowproxy.report.render_text import render_text
from shadowproxy.report.source import open_source

FORMATS = ("text", "json", "markdown", "html")


def exit_code(entries: tuple[RouteReport, ...]) -> int:
    decisions = {entry.decision for entry in entries}
    if not entries or INSUFFICIENT in decisions:
        return EXIT_INSUFFICIENT
    if NOT_READY in decisions:
        return EXIT_NOT_READY
    return EXIT_READY


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "html":
        from shadowproxy.report.render_html import render_html

        return render_html(report)
    return render_text(report)


def _settings(config_path: str) -> Settings:
    if not os.path.exists(config_path):
        raise UsageError(f"config file not found: {config_path}")
    return load_settings(config_path)


def _select_routes(settings: Settings, config_path: str, route: str | None) -> list[RouteSettings]:
    if route is None:
        return list(settings.routes)
    found = settings.route(route)
    if found is None:
        known = ", ".join(r.name for r in settings.routes) or "none"
        raise UsageError(f"{config_path}: unknown route {route!r} (routes: {known})")
    return [found]


async def build_report(
    settings: Settings,
    *,
    config_path: str,
    database_url: str | None,
    routes: list[RouteSettings],
    shadow: str | None,
    since_seconds: float,
) -> Report:
    now = time.time()
    since_ts = now - since_seconds
    source = await open_source(database_url or settings.storage.url)
    try:
        entries: list[RouteReport] = []
        for route in routes:
            seen = await source.shadows(route.name, since_ts)
            if shadow is not None:
                names = [shadow] if len(routes) == 1 or shadow in (*route.shadows, *seen) else []
            else:
                names = list(dict.fromkeys([*route.shadows, *seen]))
            for name in names:
                aggregate = await source.aggregate(route.name, name, since_ts)
                if aggregate.primary is None:
                    aggregate = replace(aggregate, primary=route.primary)
                entries.append(judge(aggregate, route.gate))
        return Report(
            generated_at=now,
            since_seconds=since_seconds,
            config_path=config_path,
            backend=source.backend,
            routes=tuple(entries),
        )
    finally:
        await source.close()


def _fail(command: str, exc: Exception) -> int:
    print(f"shadowproxy {command}: {exc}", file=sys.stderr)
    return EXIT_USAGE


def report_command(
    *,
    config_path: str,
    database_url: str | None,
    route: str | None,
    shadow: str | None,
    since: str,
    fmt: str,
    output: str | None,
) -> int:
    try:
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r} (expected {', '.join(FORMATS)})")
        since_seconds = parse_duration(since)
        settings = _settings(config_path)
        routes = _select_routes(settings, config_path, route)
        report = asyncio.run(
            build_report(
                settings,
                config_path=config_path,
                database_url=database_url,
                routes=routes,
                shadow=shadow,
                since_seconds=since_seconds,
            )
        )
        if shadow is not None and not report.routes:
            raise UsageError(f"no route of {config_path} has shadow {shadow!r}")
        text = render(report, fmt)
        if output is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            with open(output, "w", encoding="utf-8") as handle:
                handle.write(text)
    except (ConfigError, UsageError, StorageError) as exc:
        return _fail("report", exc)
    except OSError as exc:
        return _fail("report", UsageError(f"cannot write {output}: {exc.strerror}"))
    return exit_code(report.routes)


def evaluate_gate(
    *, config_path: str, database_url: str | None, route: str, shadow: str | None, since: str
) -> int:
    """The gate of one (route, shadow) for `promote --if-ready`: 0 ready, 1 not, 3 too few.

    ``shadow`` must be one of the route's configured shadows (only those can be
    promoted) and defaults to the first (the one promote swaps in). The verdict is printed as a text report so a cron log says why.
    Usage errors (unknown route or shadow, bad duration, missing config) return 2.
    """
    try:
        since_seconds = parse_duration(since)
        settings = _settings(config_path)
        (selected,) = _select_routes(settings, config_path, route)
        if shadow is None:
            if not selected.shadows:
                raise UsageError(f"{config_path}: route {route!r} has no shadow to promote")
            shadow = selected.shadows[0]
        elif shadow not in selected.shadows:
            known = ", ".join(selected.shadows) or "none"
            raise UsageError(
                f"{config_path}: route {route!r} has no shadow {shadow!r} (shadows: {known})"
            )
        report = asyncio.run(
            build_report(
                settings,
                config_path=config_path,
                database_url=database_url,
                routes=[selected],
                shadow=shadow,
                since_seconds=since_seconds,
            )
        )
    except (ConfigError, UsageError, StorageError) as exc:
        return _fail("promote", exc)
    sys.stdout.write(render_text(report))
    sys.stdout.flush()
    return exit_code(report.routes)
