"""Python's own pools on the same trivial work, 2 workers: the yardsticks for qoper8d."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from typing import Any

from bench._common import Figure, Stopwatch, figure, say


def plus_one(action: dict[str, int]) -> int:
    """The trivial handler, as a picklable top-level function."""
    return action["x"] + 1


def _actions(n: int) -> Any:
    return ({"x": i} for i in range(n))


def imap_unordered(n: int, workers: int = 2) -> tuple[float, float]:
    """Actions per second and master CPU seconds per action."""
    with mp.get_context("fork").Pool(workers) as pool:
        sum(pool.imap_unordered(plus_one, _actions(2000), chunksize=1))  # warm-up
        with Stopwatch() as sw:
            total = sum(pool.imap_unordered(plus_one, _actions(n), chunksize=1))
    assert total == n * (n + 1) // 2
    return n / sw.wall, sw.cpu / n


def executor_submit(n: int, workers: int = 2) -> tuple[float, float]:
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        list(ex.map(plus_one, _actions(500)))  # warm-up
        with Stopwatch() as sw:
            futures = [ex.submit(plus_one, a) for a in _actions(n)]
            total = sum(f.result() for f in cf.as_completed(futures))
    assert total == n * (n + 1) // 2
    return n / sw.wall, sw.cpu / n


def run(n_imap: int = 100_000, n_submit: int = 40_000) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    rate, cpu = imap_unordered(n_imap)
    out["mp_imap_unordered_cs1_rate"] = figure(
        rate, "actions/s", "multiprocessing.Pool(2).imap_unordered(chunksize=1)"
    )
    out["mp_imap_unordered_cs1_master_cpu"] = figure(cpu * 1e6, "us/action", "its master CPU")
    rate, cpu = executor_submit(n_submit)
    out["ppe_submit_rate"] = figure(
        rate, "actions/s", "ProcessPoolExecutor(2).submit, as_completed"
    )
    out["ppe_submit_master_cpu"] = figure(cpu * 1e6, "us/action", "its master CPU")
    for name, fig in out.items():
        say(f"  {name}: {fig['value']} {fig['unit']}")
    return out
