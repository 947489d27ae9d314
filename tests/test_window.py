"""The map's adaptive window (`qoper8d._window`) fed observations by hand, and driven by a
map over the sans-IO client protocol on a clock the test moves: it grows to what a fast
pool absorbs, stays small for a slow one, keeps big actions and results within their bytes,
and is not fooled by a burst. Figures against a real daemon are in bench/pipelining.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from qoper8d import _window
from qoper8d._protocol import ClientProtocol, MapRun
from qoper8d._window import AdaptiveWindow, FixedWindow, Observed, window_for


def observe(
    window: AdaptiveWindow,
    rate: float,
    rtt: float,
    *,
    seconds: float = 5.0,
    action_bytes: int = 40,
    result_bytes: int = 40,
    seen: Observed | None = None,
) -> Observed:
    """Tell `window` of `seconds` of a pool that answers `rate` actions a second, each
    submit `rtt` after it was sent: results come at that rate, or at the window's limit per
    round trip when that is less."""
    seen = seen or Observed()
    interval = window.first
    end = seen.now + seconds
    while seen.now < end:
        seen.now += interval / min(rate, window.limit / rtt)
        seen.taken += interval
        seen.sent = seen.received = seen.taken
        seen.sent_bytes, seen.received_bytes = seen.sent * action_bytes, seen.taken * result_bytes
        seen.rtt = rtt
        interval = window.learn(seen)
        assert interval >= 1
    return seen


def test_a_fast_pool_gets_results_for_the_horizon_in_flight() -> None:
    window = AdaptiveWindow()
    assert window.limit == _window.INITIAL
    observe(window, rate=40_000, rtt=0.002)
    assert window.limit == round(40_000 * _window.HORIZON)  # 10,000: past the initial


def test_a_long_round_trip_gets_twice_its_bandwidth_delay_product() -> None:
    window = AdaptiveWindow()
    observe(window, rate=20_000, rtt=0.2)
    assert window.limit == round(_window.GAIN * 20_000 * 0.2)


def test_a_slow_pool_keeps_the_window_small_and_a_huge_rate_is_capped() -> None:
    slow = AdaptiveWindow()
    observe(slow, rate=20, rtt=0.1)  # 2 workers, 100 ms each
    assert slow.limit == _window.MIN_LIMIT
    fast = AdaptiveWindow()
    observe(fast, rate=10_000_000, rtt=0.001)
    assert fast.limit == _window.MAX_LIMIT


def test_big_results_and_big_actions_keep_their_bytes_in_flight_bounded() -> None:
    results = AdaptiveWindow()
    observe(results, rate=200_000, rtt=0.002, result_bytes=1 << 20)
    assert results.limit == _window.IN_BYTES >> 20
    actions = AdaptiveWindow()
    observe(actions, rate=200_000, rtt=0.002, action_bytes=512 << 10)
    assert actions.limit == _window.OUT_BYTES // (512 << 10)


def test_a_burst_shorter_than_a_round_trip_is_not_taken_for_the_rate() -> None:
    window = AdaptiveWindow()
    seen = observe(window, rate=1_000, rtt=0.05)
    settled = window.limit
    # Every worker of a slow pool answers at once: 500 results in 1 ms, well inside a
    # round trip. The window waits for a round trip's worth of time before it measures.
    seen.now += 0.001
    seen.taken += 500
    window.learn(seen)
    assert window.limit == settled
    # The next results come when the burst's 500 would have at that rate: the burst did
    # not count.
    seen.now += 0.5
    seen.taken += 1
    window.learn(seen)
    assert window.limit == settled


def test_a_number_fixes_the_window_and_none_adapts() -> None:
    assert isinstance(window_for(None), AdaptiveWindow)
    fixed = window_for(7)
    assert isinstance(fixed, FixedWindow)
    assert fixed.limit == 7
    assert fixed.first == 0  # a fixed window is never asked to learn


def test_a_map_feeds_its_window_what_it_sees() -> None:
    now = [0.0]
    p = ClientProtocol(Path("/run/q8/test.sock"), itertools.count(1), clock=lambda: now[0])
    run = MapRun(AdaptiveWindow(), False, None, None)
    run.start(p)
    source = iter(range(100_000))
    limits = set()
    # A pool that answers everything sent at 500,000 a second, 1 ms after it was sent.
    while (head := run.fill(source)) is not None:
        if not p.responses:
            lines = p.data_to_send().splitlines()
            now[0] += 0.001 + len(lines) / 500_000
            p.receive_data(
                b"".join(b'{"id":%d,"ok":true,"result":1}\n' % json.loads(x)["id"] for x in lines)
            )
        assert head in p.responses
        run.take()
        limits.add(run.window.limit)
    assert run.observed.sent == 100_000
    assert p.received == 100_000
    assert p.rtt is not None
    # It learnt: from the initial window up to the horizon's worth at that rate.
    assert max(limits) > _window.INITIAL
    assert run.window.limit == _window.MAX_LIMIT or run.window.limit >= 500_000 * 0.04


def test_a_map_of_big_actions_sends_no_more_than_its_bytes_before_it_learns() -> None:
    p = ClientProtocol(Path("/run/q8/test.sock"), itertools.count(1))
    run = MapRun(AdaptiveWindow(), False, None, None)
    run.start(p)
    big = "x" * (1 << 20)
    run.fill(iter([big] * 100))
    sent = p.data_to_send()
    assert _window.OUT_BYTES <= len(sent) < _window.OUT_BYTES + (2 << 20)
    assert len(run.pending) == _window.OUT_BYTES >> 20
