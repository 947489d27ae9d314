"""Python's own pools on the same trivial work, 2 workers: the yardsticks for qoper8d.

Every pool is measured the same four ways: throughput (actions/s) and the master's CPU per
action in bulk, the latency of one call at a time on an idle pool (p50, p99), and start-up
(construct the pool and get the first result back; the median of a few). The action is
`{"x": i} -> i + 1`. multiprocessing, ProcessPoolExecutor and pebble start their workers by
fork (Python 3.11's default on Linux); trio-parallel by its own default, spawn.

Each measurement is guarded: a pool that breaks records an error figure, and the run goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator

from bench._common import (
    Figure,
    Stopwatch,
    error_figure,
    figure,
    median,
    percentile,
    say,
    say_figures,
)

WORKERS = 2
#: Concurrent trio tasks feeding trio-parallel (its limiter lets 2 run at once).
TRIO_TASKS = 64

SIZES = {
    "imap": 100_000,
    "apply_async": 100_000,
    "mp_map": 1_000_000,
    "ppe_submit": 40_000,
    "ppe_map": 400_000,
    "trio_parallel": 40_000,
    "pebble": 40_000,
    "latency": 2_000,
    "startup": 5,
}
QUICK_SIZES = {
    "imap": 10_000,
    "apply_async": 10_000,
    "mp_map": 100_000,
    "ppe_submit": 4_000,
    "ppe_map": 40_000,
    "trio_parallel": 4_000,
    "pebble": 4_000,
    "latency": 500,
    "startup": 3,
}

_FORK = mp.get_context("fork")


def plus_one(action: dict[str, int]) -> int:
    """The trivial handler, as a picklable top-level function."""
    return action["x"] + 1


def _actions(n: int) -> Iterator[dict[str, int]]:
    return ({"x": i} for i in range(n))


def _expected(n: int) -> int:
    return n * (n + 1) // 2


# -- the four measurements, for any pool -----------------------------------------------------


def guarded(name: str, what: str, measure: Callable[[], dict[str, Figure]]) -> dict[str, Figure]:
    """Run one measurement; if the pool breaks, an error figure `<name>_error` instead."""
    try:
        return measure()
    except Exception as exc:
        say(f"  {name}: FAILED {type(exc).__name__}: {exc}")
        return {f"{name}_error": error_figure(exc, what)}


def throughput(name: str, what: str, n: int, bulk: Callable[[int], int]) -> dict[str, Figure]:
    """`bulk(n)` runs n actions and returns the sum of their results."""
    with Stopwatch() as sw:
        total = bulk(n)
    assert total == _expected(n), f"{name}: wrong results"
    return {
        f"{name}_rate": figure(n / sw.wall, "actions/s", what),
        f"{name}_master_cpu": figure(sw.cpu / n * 1e6, "us/action", f"its master CPU: {what}"),
    }


def latency(name: str, what: str, n: int, call: Callable[[int], int]) -> dict[str, Figure]:
    """`call(i)` runs one action and waits for it; sequential calls, after a warm-up."""
    samples = []
    for i in range(n + n // 4):
        t0 = time.perf_counter()
        result = call(i)
        if i >= n // 4:
            samples.append(time.perf_counter() - t0)
        assert result == i + 1
    return {
        f"{name}_latency_p50": figure(median(samples) * 1e6, "us", f"{what}, p50"),
        f"{name}_latency_p99": figure(percentile(samples, 99) * 1e6, "us", f"{what}, p99"),
    }


def startup(
    name: str, what: str, reps: int, first_result: Callable[[], float]
) -> dict[str, Figure]:
    """`first_result()` opens a pool, runs one action, closes the pool, and returns the
    seconds from the start until that first result (closing excluded)."""
    times = [first_result() for _ in range(reps)]
    return {
        f"{name}_startup": figure(
            median(times) * 1e3, "ms", f"{what}: construct, first result (median of {reps})"
        )
    }


# -- multiprocessing.Pool ----------------------------------------------------------------------


def imap_unordered(n: int, workers: int = WORKERS) -> tuple[float, float]:
    """Actions per second and master CPU seconds per action (the engine suite's yardstick)."""
    with _FORK.Pool(workers) as pool:
        sum(pool.imap_unordered(plus_one, _actions(2000), chunksize=1))  # warm-up
        with Stopwatch() as sw:
            total = sum(pool.imap_unordered(plus_one, _actions(n), chunksize=1))
    assert total == _expected(n)
    return n / sw.wall, sw.cpu / n


def _mp_first_result() -> float:
    t0 = time.perf_counter()
    pool = _FORK.Pool(WORKERS)
    try:
        pool.apply(plus_one, ({"x": 0},))
        return time.perf_counter() - t0
    finally:
        pool.terminate()
        pool.join()


def multiprocessing_pool(sizes: dict[str, int]) -> dict[str, Figure]:
    out = guarded(
        "mp_pool",
        "multiprocessing.Pool start-up",
        lambda: startup("mp_pool", "multiprocessing.Pool(2)", sizes["startup"], _mp_first_result),
    )
    rate, cpu = imap_unordered(sizes["imap"])
    out["mp_imap_unordered_cs1_rate"] = figure(
        rate, "actions/s", "multiprocessing.Pool(2).imap_unordered(chunksize=1)"
    )
    out["mp_imap_unordered_cs1_master_cpu"] = figure(cpu * 1e6, "us/action", "its master CPU")
    with _FORK.Pool(WORKERS) as pool:
        pool.map(plus_one, list(_actions(2000)))  # warm-up

        def apply_async(n: int) -> int:
            pending = [pool.apply_async(plus_one, (a,)) for a in _actions(n)]
            return sum(r.get() for r in pending)

        out |= guarded(
            "mp_apply_async",
            "multiprocessing.Pool.apply_async",
            lambda: throughput(
                "mp_apply_async",
                "multiprocessing.Pool(2).apply_async, then get() each",
                sizes["apply_async"],
                apply_async,
            ),
        )
        # The list is built before the clock starts, as a caller holding its actions has it.
        prebuilt = list(_actions(sizes["mp_map"]))
        out |= guarded(
            "mp_map",
            "multiprocessing.Pool.map",
            lambda: throughput(
                "mp_map",
                "multiprocessing.Pool(2).map, default chunks, a pre-built list in "
                "(built outside the timing), a list out",
                len(prebuilt),
                lambda n: sum(pool.map(plus_one, prebuilt)),
            ),
        )
        out |= guarded(
            "mp_pool",
            "multiprocessing.Pool.apply latency",
            lambda: latency(
                "mp_pool",
                "multiprocessing.Pool(2).apply, one at a time",
                sizes["latency"],
                lambda i: pool.apply(plus_one, ({"x": i},)),
            ),
        )
    return out


# -- concurrent.futures.ProcessPoolExecutor ----------------------------------------------------


def executor_submit(n: int, workers: int = WORKERS) -> tuple[float, float]:
    with cf.ProcessPoolExecutor(workers, mp_context=_FORK) as ex:
        list(ex.map(plus_one, _actions(500)))  # warm-up
        with Stopwatch() as sw:
            futures = [ex.submit(plus_one, a) for a in _actions(n)]
            total = sum(f.result() for f in cf.as_completed(futures))
    assert total == _expected(n)
    return n / sw.wall, sw.cpu / n


def _ppe_first_result() -> float:
    t0 = time.perf_counter()
    ex = cf.ProcessPoolExecutor(WORKERS, mp_context=_FORK)
    try:
        ex.submit(plus_one, {"x": 0}).result()
        return time.perf_counter() - t0
    finally:
        ex.shutdown(wait=True)


def process_pool_executor(sizes: dict[str, int]) -> dict[str, Figure]:
    out = guarded(
        "ppe",
        "ProcessPoolExecutor start-up",
        lambda: startup("ppe", "ProcessPoolExecutor(2)", sizes["startup"], _ppe_first_result),
    )
    rate, cpu = executor_submit(sizes["ppe_submit"])
    out["ppe_submit_rate"] = figure(
        rate, "actions/s", "ProcessPoolExecutor(2).submit, as_completed"
    )
    out["ppe_submit_master_cpu"] = figure(cpu * 1e6, "us/action", "its master CPU")
    with cf.ProcessPoolExecutor(WORKERS, mp_context=_FORK) as ex:
        list(ex.map(plus_one, _actions(500)))  # warm-up
        out |= guarded(
            "ppe_map_cs64",
            "ProcessPoolExecutor.map(chunksize=64)",
            lambda: throughput(
                "ppe_map_cs64",
                "ProcessPoolExecutor(2).map(chunksize=64)",
                sizes["ppe_map"],
                lambda n: sum(ex.map(plus_one, _actions(n), chunksize=64)),
            ),
        )
        out |= guarded(
            "ppe",
            "ProcessPoolExecutor latency",
            lambda: latency(
                "ppe",
                "ProcessPoolExecutor(2).submit().result(), one at a time",
                sizes["latency"],
                lambda i: ex.submit(plus_one, {"x": i}).result(),
            ),
        )
    return out


# -- trio-parallel -----------------------------------------------------------------------------


def trio_parallel_pool(sizes: dict[str, int]) -> dict[str, Figure]:
    import trio
    import trio_parallel

    async def first_result() -> float:
        t0 = time.perf_counter()
        async with trio_parallel.open_worker_context() as ctx:
            await ctx.run_sync(plus_one, {"x": 0}, limiter=trio.CapacityLimiter(WORKERS))
            return time.perf_counter() - t0

    async def bench() -> dict[str, Figure]:
        out: dict[str, Figure] = {}
        # Each measurement guarded by hand: start-up and the calls need the event loop.
        try:
            times = [await first_result() for _ in range(sizes["startup"])]
            out["trio_parallel_startup"] = figure(
                median(times) * 1e3,
                "ms",
                "trio-parallel worker context (spawn), limiter 2: construct, first result "
                f"(median of {sizes['startup']})",
            )
        except Exception as exc:
            out["trio_parallel_startup_error"] = error_figure(exc, "trio-parallel start-up")
        limiter = trio.CapacityLimiter(WORKERS)
        async with trio_parallel.open_worker_context() as ctx:
            for i in range(200):  # warm-up: both workers up
                await ctx.run_sync(plus_one, {"x": i}, limiter=limiter)
            try:
                n = sizes["trio_parallel"]
                each = n // TRIO_TASKS
                n = each * TRIO_TASKS
                totals = []

                async def caller(k: int) -> None:
                    total = 0
                    for i in range(k * each, (k + 1) * each):
                        total += await ctx.run_sync(plus_one, {"x": i}, limiter=limiter)
                    totals.append(total)

                with Stopwatch() as sw:
                    async with trio.open_nursery() as nursery:
                        for k in range(TRIO_TASKS):
                            nursery.start_soon(caller, k)
                assert sum(totals) == _expected(n)
                what = f"trio_parallel run_sync from {TRIO_TASKS} concurrent trio tasks, limiter 2"
                out["trio_parallel_rate"] = figure(n / sw.wall, "actions/s", what)
                out["trio_parallel_master_cpu"] = figure(
                    sw.cpu / n * 1e6, "us/action", f"its master CPU: {what}"
                )
            except Exception as exc:
                out["trio_parallel_error"] = error_figure(exc, "trio-parallel throughput")
            try:
                samples = []
                m = sizes["latency"]
                for i in range(m + m // 4):
                    t0 = time.perf_counter()
                    await ctx.run_sync(plus_one, {"x": i}, limiter=limiter)
                    if i >= m // 4:
                        samples.append(time.perf_counter() - t0)
                what = "trio_parallel run_sync, one at a time"
                out["trio_parallel_latency_p50"] = figure(
                    median(samples) * 1e6, "us", f"{what}, p50"
                )
                out["trio_parallel_latency_p99"] = figure(
                    percentile(samples, 99) * 1e6, "us", f"{what}, p99"
                )
            except Exception as exc:
                out["trio_parallel_latency_error"] = error_figure(exc, "trio-parallel latency")
        return out

    return trio.run(bench)


# -- pebble ------------------------------------------------------------------------------------


def _pebble_first_result() -> float:
    import pebble

    t0 = time.perf_counter()
    pool = pebble.ProcessPool(max_workers=WORKERS, context=_FORK)
    try:
        pool.schedule(plus_one, args=({"x": 0},)).result()
        return time.perf_counter() - t0
    finally:
        pool.stop()
        pool.join()


def pebble_pool(sizes: dict[str, int]) -> dict[str, Figure]:
    import pebble

    out = guarded(
        "pebble",
        "pebble start-up",
        lambda: startup(
            "pebble", "pebble.ProcessPool(max_workers=2)", sizes["startup"], _pebble_first_result
        ),
    )
    pool = pebble.ProcessPool(max_workers=WORKERS, context=_FORK)
    try:
        for f in [pool.schedule(plus_one, args=(a,)) for a in _actions(500)]:  # warm-up
            f.result()

        def schedule(n: int) -> int:
            futures = [pool.schedule(plus_one, args=(a,)) for a in _actions(n)]
            return sum(f.result() for f in futures)

        out |= guarded(
            "pebble_schedule",
            "pebble.ProcessPool.schedule",
            lambda: throughput(
                "pebble_schedule",
                "pebble.ProcessPool(max_workers=2).schedule, then result() each",
                sizes["pebble"],
                schedule,
            ),
        )
        out |= guarded(
            "pebble",
            "pebble latency",
            lambda: latency(
                "pebble",
                "pebble.ProcessPool(max_workers=2).schedule().result(), one at a time",
                sizes["latency"],
                lambda i: pool.schedule(plus_one, args=({"x": i},)).result(),
            ),
        )
    finally:
        pool.close()
        pool.join()
    return out


POOLS: dict[str, Callable[[dict[str, int]], dict[str, Figure]]] = {
    "mp_pool": multiprocessing_pool,
    "ppe": process_pool_executor,
    "trio_parallel": trio_parallel_pool,
    "pebble": pebble_pool,
}


def run(quick: bool = False) -> dict[str, Figure]:
    sizes = QUICK_SIZES if quick else SIZES
    out: dict[str, Figure] = {}
    for name, measure in POOLS.items():
        figures = guarded(name, f"{name}: the pool failed", lambda m=measure: m(sizes))
        say_figures(figures)
        out |= figures
    return out
