"""Many nodes on one Redis stream, side by side with what a user would otherwise pick.

In one run, on one private redis-server (a Unix socket in a temp dir, AOF on):

- the raw round trip: XADD, a consumer process's XREADGROUP, its reply (RPUSH, PEXPIRE and
  XACK in one MULTI), the producer's BLPOP: the physical reference for one submit;
- two qoper8d nodes of one worker each on one stream, against one node of two workers alone
  (no `[cluster]`) over its socket: bulk `Client.map`, and one submit at a time;
- Celery (prefork, the same redis-server as broker and result backend, the same
  concurrency, the same trivial task): a group, and one task at a time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from bench._common import (
    ROOT,
    Figure,
    error_figure,
    figure,
    median,
    percentile,
    say,
    say_figures,
    stop,
)

HANDLER = "handlers.echo:plus_one"


def _private_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o700)
    return path


def _wait_notify(notify: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    while b"READY=1" not in notify.recv(4096):
        if proc.poll() is not None:  # pragma: no cover - a failed start
            raise RuntimeError(f"exited {proc.returncode} before it was ready")


@contextmanager
def redis_server() -> Iterator[Path]:
    """A redis-server on a private Unix socket for the block: its socket path."""
    tmp = _private_dir("q8rb-")
    sock = tmp / "redis.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp / "notify"))
        notify.settimeout(30)
        proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
             "--dir", str(tmp), "--appendonly", "yes", "--save", "", "--supervised", "systemd",
             "--daemonize", "no", "--logfile", str(tmp / "redis.log")],
            env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_notify(notify, proc)
            yield sock
        finally:
            proc.kill()
            proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)


def _write_config(tmp: Path, size: int, cluster: dict[str, Any] | None) -> None:
    config: dict[str, Any] = {
        "pool": {"size": size, "handler": HANDLER},
        "server": {"socket": str(tmp / "q.sock")},
        "monitor": {"log_format": "json", "log_level": "warning", "silent_start": True},
    }
    if cluster is not None:
        config["cluster"] = cluster
    (tmp / "q.toml").write_text(tomli_w.dumps(config))


def _start(tmp: Path) -> subprocess.Popen[bytes]:
    """Start the daemon configured in `tmp` and return once it is ready."""
    (tmp / "notify").unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp / "notify"))
        notify.settimeout(60)
        with open(tmp / "log", "ab") as log:  # warnings and errors: kept for a post-mortem
            proc = subprocess.Popen(
                [sys.executable, "-m", "qoper8d", "--config", str(tmp / "q.toml")],
                cwd=ROOT,
                env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify")},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        _wait_notify(notify, proc)
    return proc


@contextmanager
def node(size: int, cluster: dict[str, Any] | None) -> Iterator[Path]:
    """A qoper8d (a cluster node if `cluster`) for the block: its socket path."""
    tmp = _private_dir("q8nb-")
    _write_config(tmp, size, cluster)
    proc = _start(tmp)
    try:
        yield tmp / "q.sock"
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _map_rate(path: Path, n: int) -> float:
    from qoper8d import Client

    with Client(path) as client:
        list(client.map(({"x": i} for i in range(1000)), window=2048))  # warm-up
        wall = time.perf_counter()
        total = sum(client.map(({"x": i} for i in range(n)), window=2048))
        wall = time.perf_counter() - wall
    assert total == n * (n + 1) // 2
    return n / wall


def _latency(path: Path, n: int) -> list[float]:
    from qoper8d import Client

    samples = []
    with Client(path) as client:
        for i in range(n + 100):
            t0 = time.perf_counter()
            assert client.submit({"x": i}) == i + 1
            if i >= 100:
                samples.append(time.perf_counter() - t0)
    return samples


# -- the raw round trip ----------------------------------------------------------------------

_CONSUMER = """
import sys, trio, coredis
async def main(url):
    c = coredis.Redis.from_url(url)
    async with c:
        try:
            await c.xgroup_create("raw", "raw", "0", mkstream=True)
        except coredis.exceptions.StreamDuplicateConsumerGroupError:
            pass
        print("ready", flush=True)
        while True:
            got = await c.xreadgroup("raw", "c", streams={"raw": ">"}, count=100, block=1000)
            for entries in (got or {}).values():
                async with c.pipeline(transaction=True) as p:
                    for e in entries:
                        f = e.field_values
                        p.rpush(f[b"reply_to"], [str(int(f[b"x"]) + 1)])
                        p.pexpire(f[b"reply_to"], 300000)
                    p.xack("raw", "raw", [e.identifier for e in entries])
trio.run(main, sys.argv[1])
"""


def _raw_round_trip(sock: Path, n: int) -> list[float]:
    import coredis
    import trio

    url = f"unix://{sock}"
    consumer = subprocess.Popen(
        [sys.executable, "-c", _CONSUMER, url], stdout=subprocess.PIPE, cwd=ROOT
    )
    samples: list[float] = []
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline().strip() == b"ready"

        async def produce() -> None:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(url)
            async with client:
                for i in range(n + 100):
                    t0 = time.perf_counter()
                    await client.xadd("raw", {"x": str(i), "reply_to": "raw:reply"})
                    got = await client.blpop(["raw:reply"], timeout=10)
                    assert got is not None
                    assert int(got[1]) == i + 1
                    if i >= 100:
                        samples.append(time.perf_counter() - t0)

        trio.run(produce)
    finally:
        consumer.kill()
        consumer.wait()
    return samples


# -- Celery ----------------------------------------------------------------------------------

_TASKS = """
from celery import Celery
URL = "redis+socket://{sock}"
app = Celery("q8bench", broker=URL, backend=URL)
app.conf.update(
    result_expires=300, worker_prefetch_multiplier=4, broker_connection_retry_on_startup=True
)

@app.task
def plus_one(x):
    return x + 1
"""


@contextmanager
def celery_worker(sock: Path, concurrency: int) -> Iterator[Any]:
    tmp = _private_dir("q8cb-")
    (tmp / "q8tasks.py").write_text(textwrap.dedent(_TASKS.format(sock=sock)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "q8tasks", "worker", "--pool", "prefork",
         "--concurrency", str(concurrency), "--loglevel", "warning", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(tmp)},
    )  # fmt: skip
    sys.path.insert(0, str(tmp))
    try:
        import q8tasks  # type: ignore[import-not-found]

        deadline = time.monotonic() + 60
        while not q8tasks.app.control.ping(timeout=0.5):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the Celery worker did not start")
        yield q8tasks
    finally:
        sys.path.remove(str(tmp))
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _celery(sock: Path, n_group: int, n_latency: int) -> dict[str, float]:
    from celery import group

    with celery_worker(sock, 2) as tasks:
        group(tasks.plus_one.s(i) for i in range(200))().get(timeout=120)  # warm-up
        wall = time.perf_counter()
        results = group(tasks.plus_one.s(i) for i in range(n_group))().get(timeout=600)
        wall = time.perf_counter() - wall
        assert sum(results) == n_group * (n_group + 1) // 2
        samples = []
        for i in range(n_latency):
            t0 = time.perf_counter()
            assert tasks.plus_one.delay(i).get(timeout=30) == i + 1
            samples.append(time.perf_counter() - t0)
    return {"rate": n_group / wall, "p50": median(samples)}


# -- three nodes, one killed and restarted every 2 s ------------------------------------------


def _soak(sock: Path, seconds: float, claim_idle: float) -> dict[str, float]:
    """Three nodes of one worker; a client streams submits into node a while node c is
    SIGKILLed and started again every 2 s. Every submit must be answered, within
    2 x claim_idle + 2 s, with a result or `poisoned`."""
    import json
    import threading

    cluster = {"backend": "redis", "url": f"unix://{sock}", "stream": "soak",
               "claim_idle": claim_idle, "prefetch": 8}  # fmt: skip
    dirs = {name: _private_dir(f"q8s{name}-") for name in "abc"}
    for name, tmp in dirs.items():
        _write_config(tmp, 1, {**cluster, "node": name})
    procs = {name: _start(tmp) for name, tmp in dirs.items()}
    sent: dict[int, float] = {}
    answered: dict[int, float] = {}
    codes: dict[str, int] = {}
    kills = 0
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(dirs["a"] / "q.sock"))
        reader = conn.makefile("rb")
        ending = threading.Event()

        def feed() -> None:
            i = 0
            while not ending.is_set():
                batch = []
                for _ in range(20):
                    sent[i] = time.monotonic()
                    line = {"id": i, "op": "submit", "action": {"x": i}}
                    batch.append(json.dumps(line).encode() + b"\n")
                    i += 1
                conn.sendall(b"".join(batch))
                time.sleep(0.04)  # about 500 a second: a load the nodes keep up with

        def read() -> None:
            # Read as the answers come (not after the run: then "slowest" would measure
            # how long this bench left them in the socket).
            for raw in reader:
                reply = json.loads(raw)
                answered[reply["id"]] = time.monotonic()
                code = "result" if reply["ok"] else reply["error"]["code"]
                codes[code] = codes.get(code, 0) + 1

        feeder = threading.Thread(target=feed, daemon=True)
        collector = threading.Thread(target=read, daemon=True)
        collector.start()
        feeder.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(2.0)
            procs["c"].kill()
            procs["c"].wait()
            kills += 1
            procs["c"] = _start(dirs["c"])
        ending.set()
        feeder.join()
        late = time.monotonic() + 2 * claim_idle + 10  # what is not answered by then is lost
        while len(answered) < len(sent) and time.monotonic() < late:
            collector.join(0.05)
        conn.close()
        if os.environ.get("Q8_BENCH_KEEP"):
            from qoper8d import Client

            for name, tmp in dirs.items():
                with Client(tmp / "q.sock") as client:
                    got = client.status()
                    say(f"  {name}: busy {got['busy']} queued {got['queued']} {got['cluster']}")
    finally:
        for proc in procs.values():
            stop(proc)
        for name, tmp in dirs.items():
            if os.environ.get("Q8_BENCH_KEEP"):
                say(f"  node {name}: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    waits = [answered[i] - sent[i] for i in sent if i in answered]
    return {
        "submitted": len(sent),
        "lost": len(sent) - len(answered),
        "not_result_or_poisoned": sum(
            n for c, n in codes.items() if c not in ("result", "poisoned")
        ),
        "kills": kills,
        "slowest": max(waits, default=0.0),
        "unanswered": sorted(set(sent) - set(answered))[:20],
        "bound": 2 * claim_idle + 2,
    }


def run(quick: bool) -> dict[str, Figure]:
    n_map = 20_000 if quick else 100_000
    n_latency = 500 if quick else 3_000
    n_celery = 2_000 if quick else 10_000
    out: dict[str, Figure] = {}
    with redis_server() as sock:
        raw = _raw_round_trip(sock, n_latency)
        out["cluster_raw_round_trip_p50"] = figure(
            median(raw) * 1e6, "us", "XADD -> XREADGROUP -> MULTI{RPUSH,PEXPIRE,XACK} -> BLPOP"
        )
        with node(2, None) as alone:
            out["cluster_alone_map_rate"] = figure(
                _map_rate(alone, n_map), "actions/s", "one node of 2 workers, no [cluster]"
            )
            out["cluster_alone_latency_p50"] = figure(
                median(_latency(alone, n_latency)) * 1e6, "us", "the same, one submit at a time"
            )
        cluster = {"backend": "redis", "url": f"unix://{sock}", "stream": "bench"}
        with node(1, {**cluster, "node": "a"}) as a, node(1, {**cluster, "node": "b"}):
            out["cluster_map_rate"] = figure(
                _map_rate(a, n_map),
                "actions/s",
                "two nodes of 1 worker on one stream, Client.map on node a",
            )
            samples = _latency(a, n_latency)
            out["cluster_latency_p50"] = figure(
                median(samples) * 1e6, "us", "the same, one submit at a time"
            )
            out["cluster_latency_p99"] = figure(percentile(samples, 99) * 1e6, "us", "p99")
        try:
            celery = _celery(sock, n_celery, n_latency // 5)
            out["celery_group_rate"] = figure(
                celery["rate"], "tasks/s", f"Celery prefork x2, a group of {n_celery}"
            )
            out["celery_latency_p50"] = figure(
                celery["p50"] * 1e6, "us", "Celery, one task at a time (delay().get())"
            )
        except Exception as exc:  # Celery missing or failing: the rest still stands
            out["celery_error"] = error_figure(exc, "Celery beside the cluster")
        soak = _soak(sock, 10.0 if quick else 30.0, claim_idle=2.0)
        out["cluster_soak_lost"] = figure(
            soak["lost"] + soak["not_result_or_poisoned"],
            "actions",
            f"three nodes, one SIGKILLed and restarted every 2 s ({soak['kills']} kills): "
            f"of {soak['submitted']} submits, answered with neither a result nor poisoned",
        )
        out["cluster_soak_slowest"] = figure(
            soak["slowest"],
            "s",
            f"the slowest answer in that run (bound: 2 x claim_idle + 2 = {soak['bound']} s)",
        )
    say_figures(out)
    return out


def main() -> dict[str, Any]:
    return run(quick=False)
