"""A circuit breaker per shadow: stop dialing a shadow that refuses connections.

After ``threshold`` refused connects in a row the breaker opens for ``base_s`` (doubling
up to ``max_s`` while it keeps refusing); meanwhile mirrors to it are recorded at once as
``circuit_open`` instead of paying for a connect that will fail. When the pause is over,
one mirror goes through as a probe: success closes the breaker, failure reopens it.
Pure and clock-injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        base_s: float = 1.0,
        max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._failures = 0
        self._pause_s = base_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether to send this mirror to the shadow."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True  # the pause is over: one probe at a time
        return True

    def record(self, refused: bool) -> bool:
        """Note an attempt's outcome; True when this changed the breaker's state."""
        was_open = self.is_open
        if not refused:
            self._failures, self._pause_s, self._open_until, self._probing = (
                0,
                self.base_s,
                None,
                False,
            )
            return was_open
        self._failures += 1
        if self._probing:
            self._pause_s = min(self._pause_s * 2, self.max_s)
        if self._probing or self._failures >= self.threshold:
            self._open_until = self._clock() + self._pause_s
            self._probing = False
        return not was_open and self.is_open
