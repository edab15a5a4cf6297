"""`shadowproxy serve`: load the config, then run one worker or supervise N of them."""

from __future__ import annotations

import argparse
import os
import sys

from shadowproxy.base.errors import ConfigError
from shadowproxy.base.exits import EXIT_FAILED, EXIT_USAGE
from shadowproxy.config.load import load_settings
from shadowproxy.control.service import Overrides
from shadowproxy.control.workers import WORKER_ENV, run_worker, supervise
from shadowproxy.http.listener import assert_c_parser
from shadowproxy.telemetry.logs import configure_logging


def serve_command(args: argparse.Namespace) -> int:
    configure_logging(os.environ.get("SHADOWPROXY_LOG_LEVEL", "info"))
    overrides = Overrides(
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        database_url=args.database_url,
    )
    try:
        settings = overrides.apply(load_settings(args.config))
    except ConfigError as exc:
        print(f"shadowproxy serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        assert_c_parser()
    except RuntimeError as exc:
        print(f"shadowproxy serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    workers = int(args.workers)
    if workers < 1:
        print(f"shadowproxy serve: --workers must be at least 1, got {workers}", file=sys.stderr)
        return EXIT_USAGE
    if workers > 1 and WORKER_ENV not in os.environ:
        return supervise(args, workers)
    index = int(os.environ.get(WORKER_ENV, "0"))
    return run_worker(settings, overrides, worker_index=index, multi=WORKER_ENV in os.environ)
