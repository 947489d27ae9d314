"""The per-action cost of each process in bulk: qoper8d's `pool.map` and
`multiprocessing.Pool.map` (default chunks) on the same pre-built list of `{"x": i}`, 2
workers each, both pools open throughout, alternating rounds. CPU time of the master
(`process_time()`) and of each worker (utime + stime from /proc/<pid>/stat), per action of
the whole map; not part of `make bench`.

    python -m bench.map_costs            # 300,000 actions, 3 rounds
    N=100000 ROUNDS=5 python -m bench.map_costs

It prints the processes' pids first (PIDS master [qoper8d workers] [mp workers]) and,
with WAIT=<seconds>, waits that long before the rounds, so that a profiler can attach:
`py-spy record --native --format raw --duration 6 --pid <pid>`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from typing import Any

import qoper8d
from bench import engine
from bench._common import cpu_seconds
from bench.baselines import plus_one


async def _rounds(n: int, rounds: int) -> dict[str, list[dict[str, Any]]]:
    actions = [{"x": i} for i in range(n)]
    out: dict[str, list[dict[str, Any]]] = {"qoper8d": [], "mp": []}
    with mp.get_context("fork").Pool(2) as mp_pool:
        mp_pool.map(plus_one, actions[:20_000])
        mp_pids = [p.pid for p in mp_pool._pool]  # type: ignore[attr-defined]
        async with qoper8d.open_pool(engine.TRIVIAL, size=2) as pool:
            [r async for r in pool.map(actions[:20_000])]
            q_pids = [w.pid for w in pool.statistics().workers if w.pid is not None]
            print("PIDS", os.getpid(), q_pids, mp_pids, flush=True)
            time.sleep(float(os.environ.get("WAIT", "0")))  # noqa: ASYNC251 - on purpose
            for _ in range(rounds):
                for name, pids in (("mp", mp_pids), ("qoper8d", q_pids)):
                    before = [cpu_seconds(p) for p in pids]
                    cpu, wall = time.process_time(), time.perf_counter()
                    if name == "mp":
                        got = mp_pool.map(plus_one, actions)
                    else:
                        got = [r async for r in pool.map(actions)]
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    assert got == [i + 1 for i in range(n)]
                    out[name].append(
                        {
                            "rate": round(n / wall),
                            "master_us": round(cpu / n * 1e6, 3),
                            "workers_us": [
                                round((cpu_seconds(p) - b) / n * 1e6, 3)
                                for p, b in zip(pids, before, strict=True)
                            ],
                        }
                    )
    return out


def main() -> None:
    n = int(os.environ.get("N", "300000"))
    rounds = int(os.environ.get("ROUNDS", "3"))
    print(json.dumps(engine.run_quietly(lambda _: _rounds(n, rounds), None), indent=1))


if __name__ == "__main__":
    main()
