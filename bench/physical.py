"""Physical limits, measured here and now: how fast processes can talk at all.

The floors a round trip stands on, each in the shape of the path it is compared with, each
both ways a process can wait for its next message: *blocking* (a read that sleeps in the
kernel until data comes: every hop pays a wake-up) and *polled* (a busy-wait on a
non-blocking descriptor, giving way with `sched_yield` between polls, as qoper8d's own
polling does: no wake-up, but a CPU spent waiting). A design that polls must be held
against a floor that polls too; the figures compare with the better of the two.

- the in-process floor: a parent and a child, pinned to different CPUs, ping-ponging a
  pickled `{"x": i}` (the child answers `i + 1`) over two pipes: pool.run's shape (master
  and worker);
- the socket floor: three processes, client -> relay -> echo -> relay -> client, the client
  and the relay over a Unix stream socket, the relay and the echo over two pipes: the
  shape of a submit to the daemon (client, daemon, worker); unpinned, like that figure;
- the same ping-pong over a socketpair, and both ends on one CPU, for reference.

And the ceiling of bulk throughput: the parent streams msgpack-encoded batches of ~8 KiB of
`{"x": i}` actions down a pipe, the child decodes each batch and streams back the encoded
results, both pinned to their own CPU. Building the actions, encoding, decoding and the
sum are all counted; nothing else is (no dispatch, no per-action bookkeeping).
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bench._common import Figure, Stopwatch, figure, median, percentile, pinned, say_figures


def _fork_child(serve: Callable[[int, int, int], None], cpu: int) -> tuple[int, int, int]:
    """Fork a child running `serve(inbox, outbox, cpu)` on a pipe each way; returns its
    pid, the write end of its inbox and the read end of its outbox."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(to_child_w)
        os.close(to_parent_r)
        serve(to_child_r, to_parent_w, cpu)
    os.close(to_child_r)
    os.close(to_parent_w)
    return pid, to_child_w, to_parent_r


def _spin_read(fd: int) -> bytes:
    """Busy-wait for data on a non-blocking descriptor, giving way to any process waiting
    for this CPU between polls (without that, three polling processes on two CPUs wait for
    the scheduler's time slice instead of for each other)."""
    while True:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            os.sched_yield()


def _reader(fd: int, polled: bool) -> Callable[[], bytes]:
    if not polled:
        return lambda: os.read(fd, 65536)
    os.set_blocking(fd, False)
    return lambda: _spin_read(fd)


def _echo(inbox: int, outbox: int, cpu: int | None, polled: bool) -> None:
    """The child's side of every ping-pong: `{"x": i}` in, `i + 1` out, until EOF."""
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        read = _reader(inbox, polled)
        while data := read():
            action = pickle.loads(data)
            os.write(outbox, pickle.dumps(action["x"] + 1))
    finally:
        os._exit(0)  # never back into the parent's code, whatever happened


def _client_rounds(send: int, receive: int, rounds: int, polled: bool) -> list[float]:
    """The parent's side: `rounds` round trips timed, after 1,000 untimed ones."""
    read = _reader(receive, polled)
    samples: list[float] = []
    for i in range(rounds + 1000):
        t0 = time.perf_counter()
        os.write(send, pickle.dumps({"x": i}))
        assert pickle.loads(read()) == i + 1
        if i >= 1000:  # warm-up excluded
            samples.append(time.perf_counter() - t0)
    return samples


def pickle_pingpong(
    parent_cpu: int, child_cpu: int, rounds: int = 20_000, *, polled: bool = False
) -> list[float]:
    """Round-trip times in seconds over two pipes, parent pinned to one CPU and child to
    another; both block in `read`, or both poll."""
    pid, to_child_w, to_parent_r = _fork_child(
        lambda inbox, outbox, cpu: _echo(inbox, outbox, cpu, polled), child_cpu
    )
    try:
        with pinned({parent_cpu}):
            return _client_rounds(to_child_w, to_parent_r, rounds, polled)
    finally:
        os.close(to_child_w)
        os.waitpid(pid, 0)
        os.close(to_parent_r)


def relay_pingpong(rounds: int = 20_000, *, polled: bool = False) -> list[float]:
    """Round-trip times in seconds through three processes: this one (the client) -> a
    relay over a Unix stream socket -> an echo over a pipe, and back the same way. The
    relay forwards the bytes as they come; all three block in `read`, or all three poll.
    Nobody is pinned: the daemon's clients, daemon and workers are not either."""
    client, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    to_echo_r, to_echo_w = os.pipe()
    from_echo_r, from_echo_w = os.pipe()
    echo = os.fork()
    if echo == 0:  # pragma: no cover - the echo
        for fd in (client.fileno(), relay_end.fileno(), to_echo_w, from_echo_r):
            os.close(fd)
        _echo(to_echo_r, from_echo_w, None, polled)
    os.close(to_echo_r)
    os.close(from_echo_w)
    relay = os.fork()
    if relay == 0:  # pragma: no cover - the relay
        try:
            client.close()
            from_client = _reader(relay_end.fileno(), polled)
            from_echo = _reader(from_echo_r, polled)
            while data := from_client():
                os.write(to_echo_w, data)
                os.write(relay_end.fileno(), from_echo())
        finally:
            os._exit(0)
    relay_end.close()
    os.close(to_echo_w)
    os.close(from_echo_r)
    try:
        return _client_rounds(client.fileno(), client.fileno(), rounds, polled)
    finally:
        client.close()
        os.waitpid(relay, 0)
        os.waitpid(echo, 0)


def socket_pingpong(parent_cpu: int, child_cpu: int, rounds: int = 20_000) -> list[float]:
    """The blocking pickle ping-pong over a Unix stream socketpair instead of two pipes."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        parent.close()
        _echo(child.fileno(), child.fileno(), child_cpu, False)
    child.close()
    try:
        with pinned({parent_cpu}):
            return _client_rounds(parent.fileno(), parent.fileno(), rounds, False)
    finally:
        parent.shutdown(socket.SHUT_WR)
        os.waitpid(pid, 0)
        parent.close()


_HEADER = struct.Struct("<I")
#: Batches in flight at once. Kept so small that neither pipe (64 KiB) ever fills, so
#: neither side blocks on a write while the other blocks on one too.
_STREAM_WINDOW = 4


def _read_exact(f: Any, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _stream_child(inbox: int, outbox: int, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    decode = msgspec.msgpack.Decoder().decode
    encode = msgspec.msgpack.Encoder().encode
    with os.fdopen(inbox, "rb") as f:
        while header := f.read(4):
            (size,) = _HEADER.unpack(header)
            results = encode([a["x"] + 1 for a in decode(_read_exact(f, size))])
            os.write(outbox, _HEADER.pack(len(results)) + results)
    os._exit(0)


def msgpack_stream(
    parent_cpu: int, child_cpu: int, n: int, batch_bytes: int = 8192
) -> tuple[float, float, int]:
    """Stream n actions through a child in msgpack batches of about `batch_bytes`.

    Returns actions per second, the parent's CPU seconds per action, and actions per batch.
    """
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(list[int]).decode
    # Actions per batch: as many as fit in batch_bytes at the stream's typical action size.
    per_batch = max(1, batch_bytes // len(encode([{"x": n // 2}])))
    pid, to_child_w, to_parent_r = _fork_child(_stream_child, child_cpu)
    inbox = os.fdopen(to_parent_r, "rb")
    total = 0
    try:
        with pinned({parent_cpu}), Stopwatch() as sw:
            sent = 0
            in_flight = 0
            while sent < n or in_flight:
                if sent < n and in_flight < _STREAM_WINDOW:
                    end = min(n, sent + per_batch)
                    batch = encode([{"x": i} for i in range(sent, end)])
                    os.write(to_child_w, _HEADER.pack(len(batch)) + batch)
                    sent = end
                    in_flight += 1
                else:
                    (size,) = _HEADER.unpack(_read_exact(inbox, 4))
                    total += sum(decode(_read_exact(inbox, size)))
                    in_flight -= 1
    finally:
        os.close(to_child_w)
        os.waitpid(pid, 0)
        inbox.close()
    assert total == n * (n + 1) // 2
    return n / sw.wall, sw.cpu / n, per_batch


def floors(shape: str, rounds: int, cpus: list[int]) -> dict[str, float]:
    """Both floors of one shape, p50 in seconds: `<shape>_blocking` and `<shape>_polled`,
    where the shape is "pipe" (two processes pinned to the first and the last CPU: pool.run's
    path) or "relay" (three processes: a submit's path). The latency figures call this
    between their own blocks, so that the floor and the figure see the same machine."""
    if shape == "pipe":
        return {
            "pipe_blocking": median(pickle_pingpong(cpus[0], cpus[-1], rounds)),
            "pipe_polled": median(pickle_pingpong(cpus[0], cpus[-1], rounds, polled=True)),
        }
    return {
        "relay_blocking": median(relay_pingpong(rounds)),
        "relay_polled": median(relay_pingpong(rounds, polled=True)),
    }


_SHAPES = {
    "pipe": "2 processes pinned to 2 CPUs, pickle over two pipes",
    "relay": "3 processes, client -> relay (Unix socket) -> echo (pipes) and back",
}


def floor_figures(
    prefix: str, shape: str, samples: list[dict[str, float]], what: str
) -> dict[str, Figure]:
    """The median of each floor of `shape` over the blocks of a latency figure, in
    microseconds: `<prefix>_floor_blocking_p50` and `<prefix>_floor_polled_p50`."""
    return {
        f"{prefix}_floor_{how}_p50": figure(
            median([s[f"{shape}_{how}"] for s in samples]) * 1e6,
            "us",
            f"{how} ping-pong floor, {_SHAPES[shape]}: median over {what}",
            who="bound",
        )
        for how in ("blocking", "polled")
    }


def better_floor(shape: str, sample: dict[str, float]) -> float:
    """The faster of a block's two floors: what a latency figure is held against."""
    return min(sample[f"{shape}_blocking"], sample[f"{shape}_polled"])


def run(rounds: int = 20_000, stream_actions: int = 5_000_000) -> dict[str, Figure]:
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Figure] = {}
    if len(cpus) >= 2:
        for how in ("blocking", "polled"):
            cross = pickle_pingpong(cpus[0], cpus[1], rounds, polled=how == "polled")
            out[f"pipe_pingpong_{how}_p50"] = figure(
                median(cross) * 1e6,
                "us",
                f"{how} pickle round trip over two pipes, 2 processes pinned to 2 CPUs: "
                "pool.run's floor",
                who="bound",
            )
            out[f"pipe_pingpong_{how}_p99"] = figure(
                percentile(cross, 99) * 1e6, "us", "same, 99th percentile", who="bound"
            )
        cross = socket_pingpong(cpus[0], cpus[1], rounds)
        out["socket_pingpong_cross_cpu_p50"] = figure(
            median(cross) * 1e6,
            "us",
            "blocking pickle round trip over a Unix socketpair, pinned to 2 CPUs",
            who="bound",
        )
    for how in ("blocking", "polled"):
        relay = relay_pingpong(rounds, polled=how == "polled")
        out[f"relay_pingpong_{how}_p50"] = figure(
            median(relay) * 1e6,
            "us",
            f"{how} round trip through 3 unpinned processes, client -> relay over a Unix "
            "socket -> echo over pipes and back: a submit's floor",
            who="bound",
        )
        out[f"relay_pingpong_{how}_p99"] = figure(
            percentile(relay, 99) * 1e6, "us", "same, 99th percentile", who="bound"
        )
    same = pickle_pingpong(cpus[0], cpus[0], rounds)
    out["pipe_pingpong_same_cpu_p50"] = figure(
        median(same) * 1e6,
        "us",
        "blocking pickle round trip over pipes, both on one CPU",
        who="bound",
    )
    child_cpu = cpus[1] if len(cpus) >= 2 else cpus[0]
    rate, cpu, per_batch = msgpack_stream(cpus[0], child_cpu, stream_actions)
    out["msgpack_stream_rate"] = figure(
        rate,
        "actions/s",
        "msgpack batches of 8 KiB streamed through a child over pipes, pinned to 2 CPUs: "
        "the ceiling for any pool's bulk throughput here",
        actions_per_batch=per_batch,
        who="bound",
    )
    out["msgpack_stream_master_cpu"] = figure(
        cpu * 1e6, "us/action", "the parent's CPU per action in that stream", who="bound"
    )
    say_figures(out)
    return out


def main() -> dict[str, Any]:
    return run()
