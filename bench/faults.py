"""Throughput under faults: sustained `pool.map` of trivial actions while a background task
SIGKILLs one worker every 100 ms, against the same run with no kills.

A killed worker's batch is accounted for by the pool: the action it was running ends
`worker_lost` (pool.max_attempts = 1), the rest of the batch goes back to the head of the
queue. The map yields those errors in place (`return_exceptions=True`) and goes on. (A
worker killed between batches loses nothing, so there are fewer lost actions than kills.)

The two kinds of run alternate, a few rounds each, and the medians are compared, so that
both see the same machine.
"""

from __future__ import annotations

import os
import signal
import time

import trio

import qoper8d
from bench import engine
from bench._common import Figure, error_figure, figure, median, say_figures
from bench._load import Load, sustained

KILL_EVERY = 0.1
TIMES = {"warmup": 0.5, "interval": 3.0, "rounds": 3}
QUICK_TIMES = {"warmup": 0.2, "interval": 1.0, "rounds": 1}


async def _killer(pool: qoper8d.Pool, stamps: list[float]) -> None:
    """Every KILL_EVERY seconds, SIGKILL the next live worker, in slot order."""
    k = 0
    while True:
        await trio.sleep(KILL_EVERY)
        pids = [w.pid for w in pool.statistics().workers if w.pid is not None]
        if not pids:
            continue  # both slots restarting: skip this turn
        try:
            os.kill(pids[k % len(pids)], signal.SIGKILL)
        except ProcessLookupError:
            continue
        stamps.append(time.perf_counter())
        k += 1


async def one_run(times: dict[str, float], kill: bool) -> tuple[Load, int, int]:
    """The load, the kills within its measured interval, and restarts over the whole run."""
    supervisor = qoper8d.SupervisorConfig(max_restarts=100_000, backoff_initial=0.0)
    stamps: list[float] = []
    async with qoper8d.open_pool(engine.TRIVIAL, size=2, supervisor=supervisor) as pool:
        await pool.run({"x": 0})
        async with trio.open_nursery() as nursery:
            if kill:
                nursery.start_soon(_killer, pool, stamps)
            load = await sustained(
                pool,
                warmup=times["warmup"],
                interval=times["interval"],
                return_exceptions=True,
            )
            nursery.cancel_scope.cancel()
        restarts = pool.statistics().restarts
    kills = sum(load.started <= t <= load.ended for t in stamps)
    return load, kills, restarts


async def _bench(times: dict[str, float]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    rounds = int(times["rounds"])
    interval = f"{times['interval']:g} s after {times['warmup']:g} s warm-up"
    if rounds > 1:
        interval += f", median of {rounds} rounds alternating with the other kind"
    calm: list[Load] = []
    killed: list[tuple[Load, int, int]] = []
    try:
        for _ in range(rounds):
            calm.append((await one_run(times, kill=False))[0])
            killed.append(await one_run(times, kill=True))
    except Exception as exc:
        out["faults_error"] = error_figure(exc, "sustained map with or without kills")
        if not (calm and killed):
            return out
    calm_rate = median([load.rate for load in calm])
    kill_rate = median([k[0].rate for k in killed])
    out["faults_rate_without_kills"] = figure(
        calm_rate, "actions/s", f"sustained pool.map, 2 workers, no kills; {interval}"
    )
    every = f"one worker SIGKILLed every {KILL_EVERY * 1000:g} ms"
    out["faults_rate_with_kills"] = figure(
        kill_rate, "actions/s", f"the same while {every}; {interval}"
    )
    out["faults_rate_ratio"] = figure(
        kill_rate / calm_rate, "x", "throughput with kills / without (same run)"
    )
    out["faults_kills"] = figure(
        sum(k[1] for k in killed),
        "kills",
        f"workers SIGKILLed in the measured intervals ({len(killed)} of them)",
    )
    out["faults_worker_lost"] = figure(
        sum(k[0].errors for k in killed),
        "actions",
        "actions that ended with an error (worker_lost) in the measured intervals",
        completed=sum(k[0].done for k in killed),
        restarts_whole_runs=sum(k[2] for k in killed),
    )
    return out


def run(quick: bool = False) -> dict[str, Figure]:
    out = engine.run_quietly(_bench, QUICK_TIMES if quick else TIMES)
    say_figures(out)
    return out
