"""Physical limits, measured here and now: how fast two processes can talk at all.

A raw ping-pong — the parent writes a pickled `{"x": i}` to a pipe, the child unpickles it,
answers `i + 1` pickled on another pipe — with both processes pinned, on different CPUs and
on the same one (on these machines a wake-up across CPUs costs several times one on the
same CPU). No framework, no event loop: the floor any pool's round trip stands on.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

from bench._common import Figure, figure, median, percentile, pinned, say


def _pong(inbox: int, outbox: int, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    while data := os.read(inbox, 65536):
        action = pickle.loads(data)
        os.write(outbox, pickle.dumps(action["x"] + 1))
    os._exit(0)


def pickle_pingpong(parent_cpu: int, child_cpu: int, rounds: int = 20_000) -> list[float]:
    """Round-trip times in seconds, parent pinned to one CPU and child to another."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(to_child_w)
        os.close(to_parent_r)
        _pong(to_child_r, to_parent_w, child_cpu)
    os.close(to_child_r)
    os.close(to_parent_w)
    samples: list[float] = []
    try:
        with pinned({parent_cpu}):
            for i in range(rounds + 1000):
                t0 = time.perf_counter()
                os.write(to_child_w, pickle.dumps({"x": i}))
                pickle.loads(os.read(to_parent_r, 65536))
                if i >= 1000:  # warm-up excluded
                    samples.append(time.perf_counter() - t0)
    finally:
        os.close(to_child_w)
        os.waitpid(pid, 0)
        os.close(to_parent_r)
    return samples


def run(rounds: int = 20_000) -> dict[str, Figure]:
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Figure] = {}
    if len(cpus) >= 2:
        cross = pickle_pingpong(cpus[0], cpus[1], rounds)
        out["pipe_pingpong_cross_cpu_p50"] = figure(
            median(cross) * 1e6, "us", "raw pickle round trip over pipes, pinned to 2 CPUs"
        )
        out["pipe_pingpong_cross_cpu_p99"] = figure(
            percentile(cross, 99) * 1e6, "us", "same, 99th percentile"
        )
    same = pickle_pingpong(cpus[0], cpus[0], rounds)
    out["pipe_pingpong_same_cpu_p50"] = figure(
        median(same) * 1e6, "us", "raw pickle round trip over pipes, both on one CPU"
    )
    for name, fig in out.items():
        say(f"  {name}: {fig['value']} {fig['unit']}")
    return out


def main() -> dict[str, Any]:
    return run()
