"""The seed's own workload: many workers running blocking code.

Q-Oper8 exists so that children may block (a synchronous database call, say) while the
master goes on. Here: 256 workers, each action a 10 ms blocking `time.sleep` (the same
`handlers.sleep:handle` in every pool), so the ideal is 256 / 0.01 s = 25,600 actions/s
whatever the cores; what a pool adds is its master's CPU per action and its latency
between one action and the next. qoper8d (fork server, its defaults), `multiprocessing.Pool
(256)` (`map`, default chunks) and `ProcessPoolExecutor(256)` (`map`, its default chunksize
of 1), all fork-started, all fed the same pre-built list, measured in alternating rounds
(median), and beside them 256 tasks each awaiting qoper8d's `pool.run` in turn (a web
front's shape, one action a call); then an idle worker's memory as USS and PSS (from
/proc/<pid>/smaps_rollup), and the start-up of each pool at 256.

256 workers need about 1,550 descriptors in the master (`qoper8d._fds.fd_budget`). The
daemon raises its soft RLIMIT_NOFILE that far by itself; `open_pool` does not, so this
suite does what an in-process user must, with the same function.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import resource
import select
import statistics
import time
from contextlib import AsyncExitStack

import qoper8d
from bench import engine
from bench._common import (
    Figure,
    cpu_seconds,
    error_figure,
    figure,
    median,
    memory_kinds,
    parent_pid,
    say,
    say_figures,
)
from handlers.sleep import handle as sleep_handler
from qoper8d._fds import ensure_fd_limit, fd_budget

WORKERS = 256
SLEEP = 0.01
IDEAL = WORKERS / SLEEP
HANDLER = "handlers.sleep:handle"
#: Actions a worker per round: 40 (0.4 s at the ideal, about 1 s here) for the pools that
#: keep up, 10 for ProcessPoolExecutor, whose master spends ~600 us on each (2-4 s a round).
SIZES = {"per_worker": 40, "ppe_per_worker": 10, "rounds": 3}
QUICK_SIZES = {"per_worker": 10, "ppe_per_worker": 3, "rounds": 1}
#: Workers started at once when `open_pool(size=256)` cannot start them all together.
STEP = 64
MIB = 1 << 20
_FORK = mp.get_context("fork")


def _sleeper(inbox: int, outbox: int) -> None:
    """A bare worker: for each byte in, one 10 ms sleep, one byte out; no framework."""
    try:
        while os.read(inbox, 1):
            time.sleep(SLEEP)
            os.write(outbox, b"x")
    finally:
        os._exit(0)


def _floors(per_worker: int) -> dict[str, Figure]:
    """What this machine allows for the workload without any pool: `WORKERS` forked
    processes fed one action at a time over a pipe each by a master waiting in epoll, a 10
    ms sleep per action (the pool's shape with nothing else: no encoding, no bookkeeping)."""
    out: dict[str, Figure] = {}
    # (A bare set of sleepers with no master at all is no floor: started together, they stay
    # in step, and every 10 ms all 256 wake at once and queue for the two CPUs.)
    children: dict[int, tuple[int, int, int]] = {}  # read end -> (pid, write end, left)
    ep = select.epoll()
    for _ in range(WORKERS):
        to_r, to_w = os.pipe()
        back_r, back_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a sleeper
            os.close(to_w)
            os.close(back_r)
            _sleeper(to_r, back_w)
        os.close(to_r)
        os.close(back_w)
        children[back_r] = (pid, to_w, per_worker)
        ep.register(back_r, select.EPOLLIN)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _pid, to_w, _ in children.values():
        os.write(to_w, b"x")
    running = len(children)
    while running:
        for fd, _ in ep.poll():
            os.read(fd, 1)
            pid, to_w, left = children[fd]
            children[fd] = (pid, to_w, left - 1)
            if left > 1:
                os.write(to_w, b"x")
            else:
                running -= 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # Every child holds copies of the write ends made before it: close them all, then wait.
    for fd, (_pid, to_w, _) in children.items():
        os.close(to_w)
        os.close(fd)
    for pid, _, _ in children.values():
        os.waitpid(pid, 0)
    ep.close()
    out["seed_bare_pipes_rate"] = figure(
        WORKERS * per_worker / wall,
        "actions/s",
        f"{WORKERS} bare forked processes fed one byte at a time over a pipe each by an "
        "epoll master, a 10 ms sleep per byte: the pool's shape and nothing else",
        who="bound",
    )
    out["seed_bare_pipes_master_cpu"] = figure(
        cpu / (WORKERS * per_worker) * 1e6, "us/action", "that master's CPU per action", who="bound"
    )
    return out


def _memory(pids: list[int]) -> dict[str, float]:
    kinds = [memory_kinds(pid) for pid in pids]
    return {kind: statistics.median(k[kind] for k in kinds) / MIB for kind in ("uss", "pss", "rss")}


class _Meter:
    """Wall time, the master's CPU and the workers' CPU from its creation to `per_action`."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.workers0 = sum(cpu_seconds(pid) for pid in pids)
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()

    def per_action(self, n: int, got: int) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        cpu = time.process_time() - self.cpu0
        workers = sum(cpu_seconds(pid) for pid in self.pids) - self.workers0
        assert got == n, f"{got} results for {n} actions"
        return {"rate": n / wall, "master_cpu": cpu / n, "worker_cpu": workers / n}


async def _open_qoper8d(
    stack: AsyncExitStack, out: dict[str, Figure], key: str, **options: float
) -> qoper8d.Pool:
    """qoper8d at 256, its start-up timed: all at once, or in steps of `STEP` when that
    fails (the failure is recorded as an error figure)."""
    t0 = time.perf_counter()
    try:
        pool: qoper8d.Pool = await stack.enter_async_context(
            qoper8d.open_pool(HANDLER, size=WORKERS, **options)  # type: ignore[arg-type]
        )
    except qoper8d.WorkerStartError as exc:
        say(f"  open_pool(size={WORKERS}): FAILED {exc}; starting it {STEP} at a time")
        out[f"seed_{key}_startup_error"] = error_figure(
            exc, f"qoper8d.open_pool(size={WORKERS}) all at once"
        )
        t0 = time.perf_counter()
        pool = await stack.enter_async_context(
            qoper8d.open_pool(HANDLER, size=STEP, **options)  # type: ignore[arg-type]
        )
        for size in range(2 * STEP, WORKERS + 1, STEP):
            await pool.scale(size)
        out[f"seed_{key}_startup_stepwise"] = figure(
            (time.perf_counter() - t0) * 1e3,
            "ms",
            f"open_pool(size={STEP}) then scale() by {STEP} to {WORKERS}: every worker ready",
            who="ours",
        )
    else:
        out[f"seed_{key}_startup"] = figure(
            (time.perf_counter() - t0) * 1e3,
            "ms",
            f"qoper8d.open_pool(size={WORKERS}) until it returns: every worker ready",
            who="ours",
        )
    return pool


async def _bench(sizes: dict[str, int]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    was, soft = ensure_fd_limit(WORKERS, 0)
    out["seed_fd_limit"] = figure(
        soft,
        "fds",
        f"soft RLIMIT_NOFILE for {WORKERS} workers (was {was}; budget "
        f"{fd_budget(WORKERS, 0)}, hard {resource.getrlimit(resource.RLIMIT_NOFILE)[1]})",
    )
    n = WORKERS * sizes["per_worker"]
    actions = [{"seconds": SLEEP} for _ in range(n)]
    ppe_n = WORKERS * sizes["ppe_per_worker"]
    ppe_actions = actions[:ppe_n]
    warmup = actions[: 2 * WORKERS]
    out |= _floors(sizes["per_worker"])
    runs: dict[str, list[dict[str, float]]] = {
        "qoper8d": [],
        "callers": [],
        "tuned": [],
        "mp": [],
        "ppe": [],
    }
    async with AsyncExitStack() as stack:
        pool = await _open_qoper8d(stack, out, "qoper8d")
        q_pids = [w.pid for w in pool.statistics().workers if w.pid is not None]
        assert len(q_pids) == WORKERS
        [r async for r in pool.map(warmup)]
        # The same with two settings changed: `pool.idle_spin = 0` (a worker blocks for its
        # next batch at once instead of polling for 100 us: 256 pollers on 2 cores take the
        # CPU the sleepers need to wake) and `pool.preload = true` (the handler's imports,
        # anyio here, made once in the fork server, not again in each worker).
        tuned = await _open_qoper8d(stack, out, "tuned", idle_spin=0.0, preload=True)
        n_pids = [w.pid for w in tuned.statistics().workers if w.pid is not None]
        [r async for r in tuned.map(warmup)]

        t0 = time.perf_counter()
        mp_pool = stack.enter_context(_FORK.Pool(WORKERS))
        mp_pool.apply(sleep_handler, ({"seconds": 0},))
        out["seed_mp_startup"] = figure(
            (time.perf_counter() - t0) * 1e3,
            "ms",
            f"multiprocessing.Pool({WORKERS}) constructed (every worker forked), first result",
            who="peer",
        )
        mp_pids = [p.pid for p in mp_pool._pool if p.pid is not None]  # type: ignore[attr-defined]
        mp_pool.map(sleep_handler, warmup)

        t0 = time.perf_counter()
        ppe = stack.enter_context(cf.ProcessPoolExecutor(WORKERS, mp_context=_FORK))
        ppe.submit(sleep_handler, {"seconds": 0}).result()
        out["seed_ppe_startup"] = figure(
            (time.perf_counter() - t0) * 1e3,
            "ms",
            f"ProcessPoolExecutor({WORKERS}) (fork starts every worker at the first "
            "submit), first result",
            who="peer",
        )
        ppe_pids = list(ppe._processes)
        list(ppe.map(sleep_handler, warmup))

        # Idle, after the warm-up: what each worker keeps once it has run actions.
        q_mem = _memory(q_pids)
        t_mem = _memory(n_pids)
        server = parent_pid(q_pids[0])
        server_mem = memory_kinds(server) if server != os.getpid() else None

        for _ in range(sizes["rounds"]):
            meter = _Meter(q_pids)
            got = len([r async for r in pool.map(actions)])
            runs["qoper8d"].append(meter.per_action(n, got))
            meter = _Meter(q_pids)
            # A web front's shape: 256 tasks each awaiting pool.run in turn (every result
            # is checked there).
            await engine.concurrent_callers(pool, WORKERS, sizes["per_worker"], actions[0])
            runs["callers"].append(meter.per_action(n, n))
            meter = _Meter(n_pids)
            got = len([r async for r in tuned.map(actions)])
            runs["tuned"].append(meter.per_action(n, got))
            meter = _Meter(mp_pids)
            got = len(mp_pool.map(sleep_handler, actions))
            runs["mp"].append(meter.per_action(n, got))
            meter = _Meter(ppe_pids)
            got = len(list(ppe.map(sleep_handler, ppe_actions)))
            runs["ppe"].append(meter.per_action(ppe_n, got))
        mp_mem = _memory(mp_pids)
        ppe_mem = _memory(ppe_pids)

    for key, label, who in (
        ("qoper8d", f"qoper8d pool.map, {WORKERS} workers (fork server)", "ours"),
        ("callers", f"qoper8d, {WORKERS} tasks each awaiting pool.run in turn", "ours"),
        ("tuned", f"qoper8d pool.map, {WORKERS} workers, idle_spin = 0, preload", "ours"),
        ("mp", f"multiprocessing.Pool({WORKERS}).map, default chunks", "peer"),
        ("ppe", f"ProcessPoolExecutor({WORKERS}).map, chunksize 1", "peer"),
    ):
        got = runs[key]
        rounds = (
            f"{ppe_n if key == 'ppe' else n:,} actions, median of {sizes['rounds']} rounds "
            "alternating with the others"
        )
        out[f"seed_{key}_rate"] = figure(
            median([r["rate"] for r in got]),
            "actions/s",
            f"{label}: 10 ms blocking sleep per action; {rounds}",
            who=who,
        )
        out[f"seed_{key}_master_cpu"] = figure(
            median([r["master_cpu"] for r in got]) * 1e6,
            "us/action",
            f"its master's CPU per action ({key})",
            who=who,
        )
        out[f"seed_{key}_worker_cpu"] = figure(
            median([r["worker_cpu"] for r in got]) * 1e6,
            "us/action",
            f"its workers' CPU per action, all together ({key})",
            who=who,
        )
    out["seed_ideal_rate"] = figure(
        IDEAL, "actions/s", f"{WORKERS} workers / 10 ms: no pool overhead at all", who="bound"
    )
    out["seed_vs_ideal"] = figure(
        out["seed_qoper8d_rate"]["value"] / IDEAL,
        "x",
        f"qoper8d's rate / the ideal {IDEAL:,.0f}/s",
    )
    for key, mem, who in (
        ("qoper8d", q_mem, "ours"),
        ("tuned", t_mem, "ours"),
        ("mp", mp_mem, "peer"),
        ("ppe", ppe_mem, "peer"),
    ):
        for kind in ("uss", "pss", "rss"):
            out[f"seed_{key}_worker_{kind}"] = figure(
                mem[kind],
                "MiB",
                f"an idle {key} worker's {kind.upper()} after the warm-up, median of {WORKERS}",
                who=who,
            )
    if server_mem is not None:
        out["seed_forkserver_uss"] = figure(
            server_mem["uss"] / MIB, "MiB", "the fork server's own USS", who="ours"
        )
    return out


def run(quick: bool = False) -> dict[str, Figure]:
    try:
        out = engine.run_quietly(_bench, QUICK_SIZES if quick else SIZES)
    except Exception as exc:
        say(f"  seed: FAILED {exc!r}")
        out = {"seed_error": error_figure(exc, "the seed's workload")}
    say_figures(out)
    return out
