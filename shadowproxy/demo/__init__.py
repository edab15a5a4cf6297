"""The demo behind ``make run`` / ``shadowproxy demo``: two iris models, the proxy, some traffic."""

from __future__ import annotations

import sys

from shadowproxy.base.exits import EXIT_USAGE


def demo_command(port: int) -> int:
    # Deferred so `python -m shadowproxy.demo.models` does not import its own module twice,
    # and so a missing scikit-learn is explained rather than a traceback.
    try:
        from shadowproxy.demo.run import demo_command as run
    except ImportError as exc:
        print(
            f"shadowproxy demo: {exc}; the demo needs the `demo` extra: "
            "pip install 'shadowproxy[demo]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return run(port)


__all__ = ["demo_command"]
