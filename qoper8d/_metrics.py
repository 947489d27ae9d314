"""Prometheus metrics of one daemon, read from its statistics at scrape time.

Nothing here counts anything: the pool already does (`pool.statistics()`), so a scrape turns
one `PoolStatistics` record into metric families and the metrics can never disagree with
`status`. They live in a `CollectorRegistry` of the daemon's own, never prometheus-client's
global one, so that a program embedding qoper8d keeps its registry to itself and two
daemons' metrics never mix. Beside the pool's families sits prometheus-client's own
`ProcessCollector` (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
`process_open_fds`, ... of the master, read from /proc).

Labels are bounded sets: an outcome (`OUTCOMES`), a pool or worker state (`POOL_STATES`,
`WORKER_STATES`), a slot number (at most `pool.size`). Nothing an action or a result holds
ever becomes a label or a value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from qoper8d._version import __version__
from qoper8d.stats import DURATION_BOUNDS, OUTCOMES, Durations, PoolStatistics

__all__ = ["CONTENT_TYPE", "POOL_STATES", "WORKER_STATES", "PoolCollector", "open_registry"]

#: The text exposition format every Prometheus version reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Every state a pool reports (`PoolStatistics.state`), each a sample of `qoper8d_pool_state`.
POOL_STATES = ("starting", "running", "draining", "stopping", "stopped", "failed")
#: Every state a slot reports (`WorkerStatistics.state`), each a sample of `qoper8d_workers`.
WORKER_STATES = ("starting", "idle", "busy", "retiring", "backoff", "stopped")
# prometheus-client's own spelling of a bound (untyped there), so `le` labels match its own.
_go_float = cast("Callable[[float], str]", floatToGoString)
_BUCKETS = [_go_float(bound) for bound in DURATION_BOUNDS]


def duration_buckets(durations: Durations) -> list[tuple[str, float]]:
    """The histogram's cumulative buckets, `+Inf` last; every bucket 0 before any timing."""
    counts = durations.counts or (0,) * (len(DURATION_BOUNDS) + 1)
    out: list[tuple[str, float]] = []
    seen = 0
    for bound, count in zip([*_BUCKETS, "+Inf"], counts, strict=True):
        seen += count
        out.append((bound, seen))
    return out


class PoolCollector(Collector):
    """The pool's families, from `statistics()`; `daemon()` adds the daemon's own gauges
    (its `status()["daemon"]` fields and the HTTP listener's, all numbers)."""

    def __init__(
        self,
        statistics: Callable[[], PoolStatistics],
        daemon: Callable[[], Mapping[str, Any]],
    ) -> None:
        self._statistics = statistics
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        yield from _pool(stats)
        yield from _workers(stats)
        yield from _daemon(self._daemon())


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _pool(stats: PoolStatistics) -> Iterator[Metric]:
    info = GaugeMetricFamily("qoper8d_info", "The daemon's version (always 1).", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    state = GaugeMetricFamily(
        "qoper8d_pool_state", "1 for the pool's state, 0 for the others.", labels=["state"]
    )
    for name in POOL_STATES:
        state.add_metric([name], 1 if stats.state == name else 0)
    yield state
    yield _gauge("qoper8d_pool_size", "Worker slots the pool keeps.", stats.size)
    yield CounterMetricFamily(
        "qoper8d_submitted", "Actions accepted since the pool started.", value=stats.submitted
    )
    outcomes = CounterMetricFamily(
        "qoper8d_actions",
        "Actions ended, by outcome: result, or the error code.",
        labels=["outcome"],
    )
    for code in OUTCOMES:
        outcomes.add_metric([code], stats.outcomes.get(code, 0))
    yield outcomes
    yield _gauge("qoper8d_queue_depth", "Actions accepted and waiting for a worker.", stats.queued)
    yield _gauge("qoper8d_queued_bytes", "Bytes of the queued actions (JSON).", stats.queued_bytes)
    yield _gauge(
        "qoper8d_in_flight", "Actions sent to workers and not yet answered.", stats.in_flight
    )
    yield CounterMetricFamily(
        "qoper8d_worker_restarts",
        "Worker replacements after crashes, over all slots.",
        value=stats.restarts,
    )
    yield _gauge("qoper8d_uptime_seconds", "Seconds since the pool started.", stats.uptime)
    histogram = HistogramMetricFamily(
        "qoper8d_action_duration_seconds", "Seconds actions ran on a worker."
    )
    histogram.add_metric([], duration_buckets(stats.durations), stats.durations.total)
    yield histogram


def _workers(stats: PoolStatistics) -> Iterator[Metric]:
    states = GaugeMetricFamily("qoper8d_workers", "Slots in each state.", labels=["state"])
    for name in WORKER_STATES:
        states.add_metric([name], sum(1 for w in stats.workers if w.state == name))
    yield states
    longest = max((w.running_for or 0.0 for w in stats.workers), default=0.0)
    yield _gauge(
        "qoper8d_longest_running_seconds",
        "Seconds the longest-running action has been running (a hung handler shows here).",
        longest,
    )
    rss = GaugeMetricFamily(
        "qoper8d_worker_rss_bytes", "Resident memory of each slot's worker.", labels=["slot"]
    )
    done = CounterMetricFamily(
        "qoper8d_worker_actions", "Actions each slot's workers answered.", labels=["slot"]
    )
    for worker in stats.workers:
        if worker.rss_bytes is not None:
            rss.add_metric([str(worker.slot)], worker.rss_bytes)
        done.add_metric([str(worker.slot)], worker.actions_done)
    yield rss
    yield done


#: The daemon's numeric fields exported as gauges: field -> (metric, help).
_DAEMON_GAUGES = {
    "connections": ("qoper8d_connections", "Control socket clients connected."),
    "unsent_bytes": ("qoper8d_unsent_bytes", "Bytes of answers waiting for clients to read."),
    "tasks": ("qoper8d_tasks", "Trio tasks alive in the master."),
    "http_connections": ("qoper8d_http_connections", "HTTP connections open."),
    "http_event_clients": ("qoper8d_http_event_clients", "Clients of /events connected."),
}


def _daemon(fields: Mapping[str, Any]) -> Iterator[Metric]:
    for field, (name, doc) in _DAEMON_GAUGES.items():
        value = fields.get(field)
        if isinstance(value, int | float):
            yield _gauge(name, doc, value)


def open_registry(
    statistics: Callable[[], PoolStatistics], daemon: Callable[[], Mapping[str, Any]]
) -> CollectorRegistry:
    """A registry of the daemon's own: the pool's families and the master's process ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(statistics, daemon))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """One scrape: every family, in the text exposition format (`CONTENT_TYPE`)."""
    return generate_latest(registry)
