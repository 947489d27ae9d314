"""How many of a map's submits may be in flight at once: a fixed number, or one that learns.

A map pipelines: it keeps submits in flight so that the daemon always has the next action
queued when a worker frees up, and so that requests and answers cross the socket many to a
read. Too few in flight and the pool idles between round trips (256 at a time ran a fast
handler at a third of the rate of 2,048); too many and a slow handler's work sits queued for
minutes, ahead of every other client's, while big actions or results pile up in memory.

`AdaptiveWindow`, the default, sizes the window from what the map observes, as TCP's BBR
sizes a congestion window from delivery rate and round-trip time:

- in flight: at least twice rate * min_rtt (rate: the fastest results have come in lately,
  over a round trip at least; min_rtt: the shortest a submit has waited for its answer),
  the bandwidth-delay product
  doubled. While the window is what limits the rate, doubling it doubles the rate measured
  next, so it grows quickly to whatever the pool can absorb, and no further once more in
  flight only queues longer;
- and at least `HORIZON` seconds of results at that rate: a fast pool's round trip is tiny,
  but the socket's and the pool's batching pay off only with many actions per read;
- never more than `MAX_LIMIT`, nor more than `OUT_BYTES` of requests or `IN_BYTES` of
  results in flight at the sizes seen so far: big actions or results keep the window small,
  well inside the daemon's bounds (`pool.max_queue_bytes`, `server.max_unsent_bytes`).

It starts at `INITIAL`, so a map of up to that many small actions goes out in one write, and
learns first after `FIRST_LEARN` results, then at intervals that double up to a quarter of
the window: the hot path pays for a counter, the learning for a clock reading per interval.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

__all__ = ["AdaptiveWindow", "FixedWindow", "Observed", "Window", "window_for"]

#: The adaptive window's first limit: maps of 10,000 dict results ran at 0.77-0.85 of a
#: fixed 16,384 when it was 1,024, which the window held for its first two round trips
#: (three runs of 2026-12-04); 4,096 read 1.06 of 16,384 (21 alternating rounds).
INITIAL = 4096
#: Its bounds, in submits: at least this many (bytes permitting), at most that many (the
#: daemon's `pool.max_queue` is 100,000 by default and shared by every client).
MIN_LIMIT = 16
MAX_LIMIT = 16_384
#: Seconds of results to keep in flight at the observed rate.
HORIZON = 0.25
#: Bandwidth-delay product multiplier (BBR's cwnd gain).
GAIN = 2.0
#: Bytes of requests, and of results, a map may have in flight.
OUT_BYTES = 4 << 20
IN_BYTES = 8 << 20
#: Results before the window first learns; later intervals double up to a quarter window.
FIRST_LEARN = 32
#: Intervals the delivery rate is remembered over (the fastest of them counts).
RATE_MEMORY = 4


class Observed:
    """What a map has seen, handed to its window when it learns. Times are seconds on the
    clock the map was given."""

    __slots__ = (
        "now",
        "received",
        "received_bytes",
        "rtt",
        "sent",
        "sent_bytes",
        "taken",
    )

    def __init__(self) -> None:
        #: The clock, read as the window is asked to learn.
        self.now = 0.0
        #: Results the map has taken, in all.
        self.taken = 0
        #: Submits sent and the bytes of their lines, in all.
        self.sent = 0
        self.sent_bytes = 0
        #: Responses read on the connection and their bytes, in all.
        self.received = 0
        self.received_bytes = 0
        #: The round trip of the submit last timed, or None if none has been answered.
        self.rtt: float | None = None


class Window(Protocol):
    """How many of a map's submits may be in flight: `limit`. `MapRun` reads it once per
    round, before it sends the next submits, and sends one all the same when none is in
    flight. `first` results into the map (0: never), it calls `learn`, which returns how
    many results until it calls again, and may change `limit`."""

    @property
    def limit(self) -> int: ...

    @property
    def first(self) -> int: ...

    def learn(self, observed: Observed) -> int: ...


class FixedWindow:
    """At most `limit` submits in flight, always: `map(window=n)`."""

    __slots__ = ("limit",)

    first = 0

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"window must be at least 1, not {limit!r}")
        self.limit = limit

    def learn(self, observed: Observed) -> int:
        return 0


class AdaptiveWindow:
    """The default window, learning from rate, round trip and sizes (see the module)."""

    __slots__ = ("_interval", "_rates", "_since", "_taken", "limit", "min_rtt")

    first = FIRST_LEARN

    def __init__(self) -> None:
        self.limit = INITIAL
        #: The shortest round trip seen, seconds (None until one is timed).
        self.min_rtt: float | None = None
        self._rates: deque[float] = deque(maxlen=RATE_MEMORY)
        self._since: float | None = None  # when the current interval began
        self._taken = 0  # results taken when it began
        self._interval = FIRST_LEARN

    def learn(self, observed: Observed) -> int:
        now = observed.now
        if observed.rtt is not None and (self.min_rtt is None or observed.rtt < self.min_rtt):
            self.min_rtt = observed.rtt
        since = self._since
        if since is not None:
            # A rate is measured over a round trip at least: results come in bursts (every
            # worker of a pool of slow actions finishing at once), and a burst's rate is
            # not the pool's.
            if now - since < (self.min_rtt or 0.0) or now <= since:
                return self._interval
            self._rates.append((observed.taken - self._taken) / (now - since))
        self._since = now
        self._taken = observed.taken
        if self._rates:
            rate = max(self._rates)
            target = rate * HORIZON
            if self.min_rtt is not None:
                target = max(target, GAIN * rate * self.min_rtt)
            limit = max(MIN_LIMIT, min(MAX_LIMIT, round(target)))
        else:
            limit = self.limit
        self.limit = max(1, min(limit, self._byte_cap(observed)))
        self._interval = min(2 * self._interval, max(FIRST_LEARN, self.limit // 4))
        return self._interval

    @staticmethod
    def _byte_cap(observed: Observed) -> int:
        """The most submits in flight that keep requests and results within their bytes."""
        cap = MAX_LIMIT
        if observed.sent:
            cap = min(cap, OUT_BYTES * observed.sent // max(1, observed.sent_bytes))
        if observed.received:
            cap = min(cap, IN_BYTES * observed.received // max(1, observed.received_bytes))
        return cap


def window_for(window: int | None) -> Window:
    """`map`'s `window` argument as a window: a number fixes it, None adapts."""
    return AdaptiveWindow() if window is None else FixedWindow(window)
