"""qoper8d measured in the shape of the baselines: start-up, idle latency p50/p99, and bulk
throughput with master CPU, 2 workers, trivial handler — so that one table compares them."""

from __future__ import annotations

import multiprocessing as mp
import time

import qoper8d
from bench import baselines, engine
from bench._common import Figure, Stopwatch, error_figure, figure, median, percentile, say_figures

SIZES = {
    "map": 400_000,
    "callers": 100_000,
    "latency": 2_000,
    "startup": 5,
    "vs_mp_map": 300_000,
    "vs_mp_rounds": 3,
}
QUICK_SIZES = {
    "map": 50_000,
    "callers": 10_000,
    "latency": 500,
    "startup": 3,
    "vs_mp_map": 50_000,
    "vs_mp_rounds": 1,
}
_FORK = mp.get_context("fork")


async def bulk_vs_mp_map(n: int, rounds: int) -> dict[str, Figure]:
    """qoper8d's bulk `pool.map` against `multiprocessing.Pool.map` with its default chunks:
    the same pre-built list of `{"x": i}` for both, built before either clock starts, each
    keeping every result in order; 2 workers each, both pools open throughout, in
    alternating rounds, the median of each and of the ratios."""
    actions = [{"x": i} for i in range(n)]
    expected = [i + 1 for i in range(n)]
    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    # mp's workers are forked first, so that they hold none of qoper8d's descriptors.
    with _FORK.Pool(baselines.WORKERS) as mp_pool:
        mp_pool.map(baselines.plus_one, actions[:20_000])
        async with qoper8d.open_pool(engine.TRIVIAL, size=baselines.WORKERS) as pool:
            [r async for r in pool.map(actions[:20_000])]
            for _ in range(rounds):
                with Stopwatch() as sw:
                    got = mp_pool.map(baselines.plus_one, actions)
                assert got == expected
                theirs.append((n / sw.wall, sw.cpu / n))
                del got
                with Stopwatch() as sw:
                    got = [r async for r in pool.map(actions)]
                assert got == expected
                ours.append((n / sw.wall, sw.cpu / n))
                del got
    ratios = [a[0] / b[0] for a, b in zip(ours, theirs, strict=True)]
    what = f"the same pre-built list of {n:,} {{'x': i}}, results in order, 2 workers"
    return {
        "bulk_map_rate": figure(
            median([r for r, _ in ours]),
            "actions/s",
            f"qoper8d pool.map: {what}; median of {rounds} rounds",
            who="ours",
        ),
        "bulk_map_master_cpu": figure(
            median([c for _, c in ours]) * 1e6, "us/action", "its master CPU", who="ours"
        ),
        "bulk_mp_map_rate": figure(
            median([r for r, _ in theirs]),
            "actions/s",
            f"multiprocessing.Pool.map, default chunks: {what}; median of {rounds} rounds "
            "alternating with qoper8d's",
            who="peer",
        ),
        "bulk_mp_map_master_cpu": figure(
            median([c for _, c in theirs]) * 1e6, "us/action", "its master CPU", who="peer"
        ),
        "bulk_map_vs_mp_map": figure(
            median(ratios),
            "x",
            f"qoper8d pool.map / multiprocessing.Pool.map in the same round, median of {rounds}",
        ),
    }


async def first_result(start_method: str) -> float:
    t0 = time.perf_counter()
    async with qoper8d.open_pool(engine.TRIVIAL, size=2, start_method=start_method) as pool:
        await pool.run({"x": 0})
        return time.perf_counter() - t0


async def _bench(sizes: dict[str, int]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for method, suffix in (("forkserver", ""), ("spawn", "_spawn")):
        try:
            times = [await first_result(method) for _ in range(sizes["startup"])]
            out[f"qoper8d_startup{suffix}"] = figure(
                median(times) * 1e3,
                "ms",
                f"qoper8d.open_pool(size=2, start_method={method!r}): construct, first result "
                f"(median of {sizes['startup']})",
            )
        except Exception as exc:
            out[f"qoper8d_startup{suffix}_error"] = error_figure(exc, f"start-up ({method})")
    async with qoper8d.open_pool(engine.TRIVIAL, size=2) as pool:
        await pool.run({"x": 0})
        n = sizes["map"]
        with Stopwatch() as sw:
            total = 0
            async for r in pool.map({"x": i} for i in range(n)):
                total += r
        assert total == n * (n + 1) // 2
        out["qoper8d_map_rate"] = figure(n / sw.wall, "actions/s", "qoper8d pool.map, 2 workers")
        out["qoper8d_map_master_cpu"] = figure(
            sw.cpu / n * 1e6, "us/action", "its master CPU, caller's loop included"
        )
        tasks = baselines.TRIO_TASKS
        each = sizes["callers"] // tasks
        with Stopwatch() as sw:
            await engine.concurrent_callers(pool, tasks, each)
        n = tasks * each
        what = f"qoper8d pool.run from {tasks} concurrent trio tasks, 2 workers"
        out[f"qoper8d_run_{tasks}_callers_rate"] = figure(n / sw.wall, "actions/s", what)
        out[f"qoper8d_run_{tasks}_callers_master_cpu"] = figure(
            sw.cpu / n * 1e6, "us/action", f"its master CPU: {what}"
        )
        samples = await engine.idle_latency(pool, sizes["latency"])
        what = "qoper8d pool.run, one at a time, unpinned"
        out["qoper8d_latency_p50"] = figure(median(samples) * 1e6, "us", f"{what}, p50")
        out["qoper8d_latency_p99"] = figure(percentile(samples, 99) * 1e6, "us", f"{what}, p99")
    try:
        out |= await bulk_vs_mp_map(sizes["vs_mp_map"], sizes["vs_mp_rounds"])
    except Exception as exc:
        out["bulk_map_error"] = error_figure(exc, "pool.map beside multiprocessing.Pool.map")
    return out


def run(quick: bool = False) -> dict[str, Figure]:
    out = engine.run_quietly(_bench, QUICK_SIZES if quick else SIZES)
    say_figures(out)
    return out
