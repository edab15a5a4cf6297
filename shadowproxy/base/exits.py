"""Every exit code a ``shadowproxy`` command returns, in one place.

``report`` and ``promote --if-ready`` share the gate's codes, so a CI job reads the same
number from either: 0 ready, 1 not ready, 3 too few samples; 2 is always bad input
(an invalid routes.yaml, a bad flag, an unreachable store).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_READY = EXIT_OK  # report: every gate passed
EXIT_FAILED = 1  # serve/demo: could not run (e.g. aiohttp without its C parser)
EXIT_NOT_READY = 1  # report/promote: a gate failed
EXIT_USAGE = 2  # invalid config, flag or store URL
EXIT_INSUFFICIENT = 3  # report/promote: too few samples to decide
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
