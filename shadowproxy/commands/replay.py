"""`shadowproxy replay ROUTE --to URL`: check the flags, run the replay, print the summary."""

from __future__ import annotations

import asyncio
import sys
import time

from shadowproxy.base.errors import ConfigError, StorageError, UsageError
from shadowproxy.base.exits import EXIT_OK, EXIT_USAGE
from shadowproxy.config.durations import parse_duration
from shadowproxy.config.load import load_settings
from shadowproxy.replay.runner import DEFAULT_NAME, run_replay


def replay_command(
    *,
    route: str,
    to: str,
    config_path: str,
    database_url: str | None,
    since: str,
    limit: int | None,
    rate: float,
    concurrency: int,
    name: str | None,
) -> int:
    """0 when every selected request was replayed (the candidate's failures are data,
    recorded as shadow errors); 2 on a usage error or an unusable store."""
    try:
        since_seconds = parse_duration(since)
        if not to.startswith(("http://", "https://")):
            raise UsageError(f"--to {to!r}: expected an http:// or https:// URL")
        if rate <= 0 or concurrency < 1 or (limit is not None and limit < 1):
            raise UsageError("--rate must be > 0, --concurrency >= 1 and --limit >= 1")
        settings = load_settings(config_path)
        selected = settings.route(route)
        if selected is None:
            known = ", ".join(r.name for r in settings.routes) or "none"
            raise UsageError(f"{config_path}: unknown route {route!r} (routes: {known})")
        label = name or DEFAULT_NAME
        progress = asyncio.run(
            run_replay(
                settings=settings,
                route=selected,
                to=to,
                store_url=database_url or settings.storage.url,
                since_ts=time.time() - since_seconds,
                limit=limit,
                rate=rate,
                concurrency=concurrency,
                name=label,
            )
        )
    except (ConfigError, UsageError, StorageError) as exc:
        print(f"shadowproxy replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"replayed {progress.sent} requests of route {route!r} to {to} as {label!r}: "
        f"{progress.agreed} agree, {progress.errors} shadow errors, {progress.skipped} skipped "
        f"(body not stored or truncated, or primary failed). "
        f"Judge it: shadowproxy report --route {route} --shadow {label}",
        file=sys.stderr,
    )
    return EXIT_OK
