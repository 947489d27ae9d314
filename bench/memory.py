"""Memory: an idle worker's RSS, the master's RSS growth over a long bulk run, and what one
queued action costs the master.

RSS is read from /proc after `gc.collect()`, so that it shows what is kept, not garbage
waiting for a collection. The bulk run is warmed up first, so that caches, free lists and
malloc arenas have reached their working size before the "before" reading. The suite runs in
a fresh interpreter (`python -m bench.memory`): in the process that ran the other suites,
their leftover heap would hide growth and inflate the base it is a percentage of.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

import trio

import qoper8d
from bench import engine
from bench._common import ROOT, Figure, error_figure, figure, rss_bytes, say, say_figures

SIZES = {"warmup": 50_000, "bulk": 1_000_000, "queued": 1_000_000}
QUICK_SIZES = {"warmup": 50_000, "bulk": 1_000_000, "queued": 200_000}

MIB = 1 << 20


def _master_rss() -> int:
    gc.collect()
    return rss_bytes()


async def _drain(pool: qoper8d.Pool, n: int, start: int = 0) -> None:
    total = 0
    async for r in pool.map({"x": i} for i in range(start, start + n)):
        total += r
    assert total == sum(range(start + 1, start + n + 1))


async def worker_and_master(sizes: dict[str, int]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    async with qoper8d.open_pool(engine.TRIVIAL, size=2) as pool:
        await pool.run({"x": 0})
        rss = [w.rss_bytes for w in pool.statistics().workers if w.rss_bytes is not None]
        out["worker_rss_idle"] = figure(
            sum(rss) / len(rss) / MIB,
            "MiB",
            "an idle worker's RSS (trivial handler), mean over the pool",
            workers=len(rss),
        )
        await _drain(pool, sizes["warmup"])
        before = _master_rss()
        await _drain(pool, sizes["bulk"], sizes["warmup"])
        after = _master_rss()
        rss = [w.rss_bytes for w in pool.statistics().workers if w.rss_bytes is not None]
    n = sizes["bulk"]
    out["master_rss_before"] = figure(
        before / MIB, "MiB", f"master RSS after {sizes['warmup']:,} warm-up actions"
    )
    out["master_rss_after"] = figure(
        after / MIB, "MiB", f"master RSS after {n:,} more actions through pool.map"
    )
    out["master_rss_growth"] = figure(
        (after - before) / before * 100, "%", f"master RSS growth over {n:,} trivial actions"
    )
    out["worker_rss_after_bulk"] = figure(
        sum(rss) / len(rss) / MIB, "MiB", "a worker's RSS after the bulk run, mean over the pool"
    )
    return out


async def per_queued_action(n: int) -> dict[str, Figure]:
    """RSS growth of the master while n actions sit queued behind a blocked worker."""
    # Left by cancellation, so that the pool kills its worker at once: left normally, it
    # would give the (withdrawn, but running) 60 s action `grace_period` to finish.
    with trio.CancelScope() as scope:
        async with qoper8d.open_pool("handlers.sleep:handle", size=1, max_queue=2 * n) as pool:
            before = _master_rss()

            async def submit() -> None:
                async for _ in pool.map(({"seconds": 60} for _ in range(n)), window=n):
                    raise AssertionError("a 60 s action finished")

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(submit)
                # The one worker takes a first batch and blocks in it; the rest stays queued.
                # The pool has no event for "n queued": polling its statistics is fine here.
                while (s := pool.statistics()).queued + s.in_flight < n:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                submitted_in = time.perf_counter() - t0
                queued = s.queued
                after = _master_rss()
                scope.cancel()
    return {
        "queued_action_bytes": figure(
            (after - before) / n,
            "bytes",
            f'master RSS growth per queued action, {n:,} queued `{{"seconds": 60}}` actions',
            queued=queued,
        ),
        "queued_master_rss": figure(after / MIB, "MiB", f"master RSS with {n:,} actions queued"),
        "queued_submit_seconds": figure(
            submitted_in, "s", f"pool.map(window={n:,}) until all {n:,} were queued"
        ),
    }


async def _bench(sizes: dict[str, int]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    try:
        out |= await worker_and_master(sizes)
    except Exception as exc:
        say(f"  master_rss: FAILED {exc!r}")
        out["master_rss_error"] = error_figure(exc, "worker and master RSS")
    try:
        out |= await per_queued_action(sizes["queued"])
    except Exception as exc:
        say(f"  queued_action_bytes: FAILED {exc!r}")
        out["queued_action_error"] = error_figure(exc, "memory per queued action")
    return out


def measure(quick: bool = False) -> dict[str, Figure]:
    """The suite, in this process."""
    return engine.run_quietly(_bench, QUICK_SIZES if quick else SIZES)


def run(quick: bool = False) -> dict[str, Figure]:
    """The suite, in a fresh interpreter; its figures come back as JSON on its stdout."""
    argv = [sys.executable, "-m", "bench.memory", *(["--quick"] if quick else [])]
    try:
        child = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
        out: dict[str, Figure] = json.loads(child.stdout)
    except (subprocess.CalledProcessError, ValueError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        say(f"  memory: FAILED {exc!r}\n{stderr}")
        out = {"memory_error": error_figure(exc, "the memory suite's process failed")}
    say_figures(out)
    return out


if __name__ == "__main__":
    json.dump(measure("--quick" in sys.argv[1:]), sys.stdout)
