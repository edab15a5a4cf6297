"""Event-loop lag as the overload signal: mirrors are shed while the loop runs late."""

from __future__ import annotations

import asyncio
import time


class LoopLagMonitor:
    """Samples how late a periodic wake-up fires; ``overloaded`` while lag exceeds the threshold.

    Hysteresis (recover below half the threshold) keeps shedding from flapping.
    """

    def __init__(self, *, interval_s: float = 0.05, threshold_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.threshold_s = threshold_s
        self.overloaded = False
        self.lag_s = 0.0
        self.ticks = 0
        self.tick_event = asyncio.Event()  # set after each sample, for tests and waiters

    def sample(self, lag_s: float) -> None:
        self.lag_s = lag_s
        if lag_s > self.threshold_s:
            self.overloaded = True
        elif lag_s < self.threshold_s / 2:
            self.overloaded = False
        self.ticks += 1
        self.tick_event.set()
        self.tick_event.clear()

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.sample(max(0.0, time.perf_counter() - started - self.interval_s))
