"""When to replace a crashed worker, and when to give up: pure logic, no clock of its own.

* Backoff is per slot (one-for-one): the first crash after a stable run is replaced at
  once; each further crash of the same slot waits `backoff_initial * 2**(n-2)`, capped at
  `backoff_max`, scaled by a random factor in [0.5, 1) so crashing slots do not restart in
  lock-step. A worker that ran `backoff_reset` seconds counts as stable and clears the streak.
* Intensity is pool-wide: more than `max_restarts` crashes within `restart_window` seconds
  means restarting is not helping, and the pool fails loudly instead of looping.
"""

from __future__ import annotations

import random
from collections import deque

from qoper8d.config import SupervisorConfig

__all__ = ["Backoff", "RestartIntensity"]


class Backoff:
    """One slot's crash streak and the delay before its next restart."""

    __slots__ = ("_rng", "config", "streak")

    def __init__(self, config: SupervisorConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self.streak = 0

    def delay_after_crash(self, ran_for: float) -> float:
        """Record a crash of a worker that ran `ran_for` seconds; seconds to wait to restart."""
        cfg = self.config
        if ran_for >= cfg.backoff_reset:
            self.streak = 0
        self.streak += 1
        if self.streak == 1:
            return 0.0
        base: float = min(cfg.backoff_max, cfg.backoff_initial * 2.0 ** (self.streak - 2))
        return base * (0.5 + self._rng.random() / 2)


class RestartIntensity:
    """Crash times within the window; `record()` says whether the limit is now exceeded."""

    __slots__ = ("_times", "config")

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Record a crash at `now`; True if there were more than `max_restarts` in the window."""
        times = self._times
        times.append(now)
        horizon = now - self.config.restart_window
        while times and times[0] < horizon:
            times.popleft()
        return len(times) > self.config.max_restarts
