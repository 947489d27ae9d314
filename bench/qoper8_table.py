"""Q-Oper8's own benchmark table, reproduced: sustained throughput of the trivial handler by
pool size (1 to 10, every row Q-Oper8 published), and by `max_batch_bytes` at 2 workers.

Q-Oper8 (2011) measured it by keeping its queue topped up and counting completions per
second; so do we: `pool.map` over an endless source keeps 1,000 to 2,000 actions outstanding,
and completions are counted over a fixed interval after a warm-up. Its published figures
(4 CPUs, Node.js 0.4) go into the results beside ours, with this machine's core count: on
2 cores, sizes past 2 share the CPUs with the master and with each other.
"""

from __future__ import annotations

import os

import qoper8d
from bench import engine
from bench._common import Figure, error_figure, figure, say, say_figures
from bench._load import sustained

POOL_SIZES = range(1, 11)
BATCH_BYTES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
#: Q-Oper8's published table, all ten rows: child processes -> actions/s, on 4 CPUs with
#: Node.js 0.4.
PUBLISHED = {
    1: 19_580,
    2: 40_540,
    3: 59_920,
    4: 90_630,
    5: 88_120,
    6: 85_570,
    7: 65_460,
    8: 63_200,
    9: 61_670,
    10: 60_730,
}

TIMES = {"warmup": 0.5, "interval": 3.0}
QUICK_TIMES = {"warmup": 0.2, "interval": 0.6}


async def sustained_rate(times: dict[str, float], **pool_options: object) -> tuple[float, float]:
    """Actions per second and master CPU microseconds per action."""
    async with qoper8d.open_pool(engine.TRIVIAL, **pool_options) as pool:
        await pool.run({"x": 0})
        load = await sustained(pool, warmup=times["warmup"], interval=times["interval"])
    return load.rate, load.cpu_per_action * 1e6


async def _bench(times: dict[str, float]) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    interval = f"{times['interval']:g} s after {times['warmup']:g} s warm-up"
    runs: list[tuple[str, str, dict[str, object]]] = [
        (f"sustained_size_{size}", f"{size} worker(s)", {"size": size}) for size in POOL_SIZES
    ]
    runs += [
        (
            f"sustained_batch_{b}",
            f"2 workers, max_batch_bytes={b}",
            {"size": 2, "max_batch_bytes": b},
        )
        for b in BATCH_BYTES
    ]
    for name, what, options in runs:
        try:
            rate, cpu = await sustained_rate(times, **options)
        except Exception as exc:
            out[f"{name}_error"] = error_figure(exc, what)
            say(f"  {name}: FAILED {exc!r}")
            continue
        out[f"{name}_rate"] = figure(
            rate,
            "actions/s",
            f"sustained pool.map, 1,000-2,000 outstanding, {what}; {interval}",
            who="ours",
        )
        out[f"{name}_master_cpu"] = figure(cpu, "us/action", f"its master CPU ({what})", who="ours")
        say(f"  {name}_rate: {out[f'{name}_rate']['value']} actions/s")
    return out


def run(quick: bool = False) -> dict[str, Figure]:
    out = engine.run_quietly(_bench, QUICK_TIMES if quick else TIMES)
    for size, rate in PUBLISHED.items():
        out[f"qoper8_published_size_{size}_rate"] = figure(
            rate,
            "actions/s",
            f"Q-Oper8's published table, {size} child process(es), 4 CPUs, Node.js 0.4",
            cpus=4,
            who="peer",
        )
        ours = out.get(f"sustained_size_{size}_rate")
        if ours is not None:
            out[f"sustained_size_{size}_vs_qoper8"] = figure(
                ours["value"] / rate,
                "x",
                f"ours / Q-Oper8's published, {size} worker(s) (different machines: "
                f"{os.cpu_count()} cores here, 4 there)",
            )
    out["table_cpus"] = figure(os.cpu_count() or 0, "cores", "this machine's cores")
    out["table_usable_cpus"] = figure(
        len(os.sched_getaffinity(0)), "cores", "cores this process may run on"
    )
    say_figures({k: v for k, v in out.items() if not k.startswith("sustained_")})
    return out
