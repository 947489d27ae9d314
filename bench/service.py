"""qoper8d as a service: the daemon in its own process, spoken to over its Unix socket.

Three ways in: the blocking client's pipelined `map`, one `submit` at a time (latency,
compared with the pinned pipe ping-pong in alternating blocks), and `qoper8ctl submit` fed
NDJSON on stdin. JSON both ways, a process hop each way: the cost of the service on top of
the pool.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from bench import physical
from bench._common import (
    ROOT,
    Figure,
    cpu_seconds,
    figure,
    median,
    percentile,
    say_figures,
    stop,
)

HANDLER = "handlers.echo:plus_one"
#: Daemon starts the idle latency is measured over.
LATENCY_STARTS = 3


@contextmanager
def daemon(size: int = 2, handler: str = HANDLER) -> Iterator[tuple[Path, int]]:
    """A qoper8d for the block: (socket path, pid), ready when it is yielded."""
    tmp = Path(tempfile.mkdtemp(prefix="q8b-", dir="/tmp"))
    os.chmod(tmp, 0o700)
    config = {
        "pool": {"size": size, "handler": handler},
        "server": {"socket": str(tmp / "q.sock")},
        "monitor": {"log_format": "json", "log_level": "warning", "silent_start": True},
    }
    (tmp / "q.toml").write_text(tomli_w.dumps(config))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify"))
    notify.settimeout(60)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qoper8d", "--config", str(tmp / "q.toml")],
        cwd=ROOT,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        yield tmp / "q.sock", proc.pid
    finally:
        stop(proc)
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _client_map(path: Path, pid: int, n: int) -> dict[str, float]:
    from qoper8d import Client

    with Client(path) as client:
        list(client.map({"x": i} for i in range(2000)))  # warm-up
        daemon_cpu = cpu_seconds(pid)
        cpu = time.process_time()
        wall = time.perf_counter()
        total = sum(client.map({"x": i} for i in range(n)))  # the default window
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        daemon_cpu = cpu_seconds(pid) - daemon_cpu
    assert total == n * (n + 1) // 2
    return {"rate": n / wall, "client_cpu": cpu / n, "daemon_cpu": daemon_cpu / n}


def _latency(path: Path, n: int) -> list[float]:
    from qoper8d import Client

    samples = []
    with Client(path) as client:
        for i in range(n + 200):
            t0 = time.perf_counter()
            client.submit({"x": i})
            if i >= 200:
                samples.append(time.perf_counter() - t0)
    return samples


def _ctl_submit(path: Path, n: int) -> float:
    lines = "".join(f'{{"x": {i}}}\n' for i in range(n)).encode()
    wall = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from qoper8d.cli import ctl_main; sys.exit(ctl_main())",
            "--socket",
            str(path),
            "submit",
        ],
        input=lines,
        capture_output=True,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    wall = time.perf_counter() - wall
    assert done.stdout.count(b"\n") == n
    return n / wall


def run(quick: bool) -> dict[str, Figure]:
    n_map = 20_000 if quick else 200_000
    n_latency = 1_000 if quick else 5_000
    n_ctl = 5_000 if quick else 50_000
    out: dict[str, Figure] = {}
    with daemon() as (path, pid):
        best = _client_map(path, pid, n_map)
        out["socket_map_rate"] = figure(
            best["rate"],
            "actions/s",
            "Client.map over the socket (daemon: 2 workers), its default window",
        )
        out["socket_map_daemon_cpu"] = figure(
            best["daemon_cpu"] * 1e6, "us/action", "the daemon's CPU per action in that map"
        )
        out["socket_map_client_cpu"] = figure(
            best["client_cpu"] * 1e6, "us/action", "the client's CPU per action in that map"
        )
        out["ctl_submit_rate"] = figure(
            _ctl_submit(path, n_ctl),
            "actions/s",
            f"qoper8ctl submit fed {n_ctl} NDJSON actions on stdin (process start included)",
        )
    # Three processes (client, daemon, worker) share two CPUs, and where the scheduler puts
    # them at a daemon's start moves this figure by up to a third: three daemon starts,
    # five blocks each, alternating with the three-process floors.
    cpus = sorted(os.sched_getaffinity(0))
    ratios: list[float] = []
    floors: list[dict[str, float]] = []
    ours: list[float] = []
    block_size = max(500, n_latency // 5)
    for _ in range(LATENCY_STARTS):
        with daemon() as (path, _pid):
            for _ in range(5):
                floor = physical.floors("relay", block_size, cpus)
                block = _latency(path, block_size)
                ours += block
                floors.append(floor)
                ratios.append(median(block) / physical.better_floor("relay", floor))
    out["socket_latency_p50"] = figure(
        median(ours) * 1e6, "us", "one Client.submit at a time on an idle daemon", who="ours"
    )
    out["socket_latency_p99"] = figure(percentile(ours, 99) * 1e6, "us", "the same, p99")
    out |= physical.floor_figures(
        "socket_latency",
        "relay",
        floors,
        f"the {len(floors)} blocks alternating with those",
    )
    out["socket_latency_vs_pingpong"] = figure(
        median(ratios),
        "x",
        "idle submit p50 over the socket / the better of the blocking and the polled "
        "three-process relay p50 in the same block, "
        f"median of {LATENCY_STARTS} daemon starts x 5 alternating blocks",
    )
    say_figures(out)
    return out


def main() -> dict[str, Any]:
    return run(quick=False)
