"""The `shadowproxy` console script: a thin layer that parses arguments and calls one command.

Exit codes: 0 success; 1 gate not passed; 2 usage or invalid input; 3 too few samples.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from shadowproxy.base.errors import ConfigError, UsageError
from shadowproxy.base.exits import EXIT_INTERRUPTED, EXIT_USAGE


def default_config_path() -> str:
    return os.environ.get("SHADOWPROXY_CONFIG") or "config/routes.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shadowproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help="routes.yaml ($SHADOWPROXY_CONFIG)")

    def database_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--database-url", default=None, help="overrides storage.url ($SHADOWPROXY_DATABASE_URL)"
        )

    p = sub.add_parser("serve", help="run the proxy and its admin listener")
    config_arg(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--admin-host")
    p.add_argument("--admin-port", type=int)
    p.add_argument("--workers", type=int, default=1)
    database_arg(p)

    p = sub.add_parser("check", help="validate routes.yaml: exit 0 valid, 2 invalid")
    config_arg(p)

    p = sub.add_parser("report", help="promotion report per route and shadow")
    config_arg(p)
    database_arg(p)
    p.add_argument("--route")
    p.add_argument("--shadow")
    p.add_argument("--since", default="24h")
    p.add_argument(
        "--format", dest="fmt", default="text", choices=["text", "json", "markdown", "html"]
    )
    p.add_argument("--output")

    p = sub.add_parser("promote", help="swap primary and shadow of a route")
    p.add_argument("route")
    p.add_argument("--shadow")
    config_arg(p)
    p.add_argument("--admin-url")
    p.add_argument("--if-ready", action="store_true")
    database_arg(p)
    p.add_argument("--since", default="24h")

    p = sub.add_parser("replay", help="re-send recorded requests to a candidate")
    p.add_argument("route")
    p.add_argument("--to", required=True)
    config_arg(p)
    database_arg(p)
    p.add_argument("--since", default="24h")
    p.add_argument("--limit", type=int)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--name")

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["migrate", "status"])
    config_arg(p)
    database_arg(p)

    p = sub.add_parser("demo", help="two demo models, the proxy and some traffic")
    p.add_argument("--port", type=int, default=8080)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "unset") is None:
        args.config = default_config_path()
    if getattr(args, "database_url", "unset") is None:
        args.database_url = os.environ.get("SHADOWPROXY_DATABASE_URL")
    try:
        return _dispatch(args)
    except (ConfigError, UsageError) as exc:
        print(f"shadowproxy {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    # Imports are deferred so `shadowproxy check` does not pay for aiohttp or asyncpg.
    command: str = args.command
    if command == "serve":
        from shadowproxy.commands.serve import serve_command

        return serve_command(args)
    if command == "check":
        from shadowproxy.commands.check import check_command

        return check_command(args.config)
    if command == "report":
        from shadowproxy.commands.report import report_command

        return report_command(
            config_path=args.config,
            database_url=args.database_url,
            route=args.route,
            shadow=args.shadow,
            since=args.since,
            fmt=args.fmt,
            output=args.output,
        )
    if command == "promote":
        from shadowproxy.commands.promote import promote_command

        return promote_command(
            route=args.route,
            shadow=args.shadow,
            config_path=args.config,
            admin_url=args.admin_url,
            if_ready=args.if_ready,
            database_url=args.database_url,
            since=args.since,
        )
    if command == "replay":
        from shadowproxy.commands.replay import replay_command

        return replay_command(
            route=args.route,
            to=args.to,
            config_path=args.config,
            database_url=args.database_url,
            since=args.since,
            limit=args.limit,
            rate=args.rate,
            concurrency=args.concurrency,
            name=args.name,
        )
    if command == "db":
        from shadowproxy.commands.db import db_command

        return db_command(args.action, config_path=args.config, database_url=args.database_url)
    if command == "demo":
        from shadowproxy.demo import demo_command

        return demo_command(port=args.port)
    raise UsageError(f"unknown command {command!r}")
