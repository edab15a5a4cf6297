"""`shadowproxy check`: validate routes.yaml without starting anything."""

from __future__ import annotations

import sys

from shadowproxy.base.errors import ConfigError
from shadowproxy.base.exits import EXIT_OK, EXIT_USAGE
from shadowproxy.config.load import load_settings


def check_command(config_path: str) -> int:
    """`shadowproxy check`: exit 0 when valid, 2 with the error otherwise."""
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"shadowproxy check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    shadows = sum(len(r.shadows) for r in settings.routes)
    print(
        f"{config_path}: OK ({len(settings.routes)} routes, {len(settings.upstreams)} upstreams, "
        f"{shadows} shadows; sha256 {settings.sha256[:12]})"
    )
    return EXIT_OK
