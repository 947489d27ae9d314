"""What a trio memory channel would cost per action, beside the engine's own queue.

    python -m bench.queue_cost

The design card says work is dispatched "from a memory channel as events arrive"; the
engine keeps its own `JobQueue` instead. This measures both doing the queue's job in bulk
(an action queued, then taken out as part of a batch for a worker) in one process, so the
README can say what the choice is worth: per action, in nanoseconds, median of rounds.

- `jobqueue`: `JobQueue.extend` of a refill, then `take` of batches cut to 8 KiB (the
  engine's bulk path: a slice per batch, one bisect);
- `channel`: `send_nowait` per action into an unbounded memory channel, `receive_nowait` per
  action out of it into batches of the same length (a channel hands items out one by one);
- `channel_batched`: the same, but sending whole batches as one item (what a channel-based
  engine would have to do to keep per-batch costs; it loses the byte cut and the per-job
  cancellation, which then need their own structures again).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from itertools import repeat

import trio

from bench._common import RESULTS
from qoper8d._jobqueue import JobQueue
from qoper8d._jobs import Job

N = 200_000
MAX_BATCH_BYTES = 8192
ROUNDS = 7


class _Sink:
    def result(self, *args: object) -> None: ...

    def results(self, *args: object) -> None: ...

    def error(self, *args: object) -> None: ...


def _jobs() -> tuple[list[Job], list[bytes]]:
    sink = _Sink()
    payloads = [b'{"x":%d}' % i for i in range(N)]
    return list(map(Job, payloads, repeat(sink), range(N))), payloads


def jobqueue_round(jobs: list[Job], payloads: list[bytes]) -> float:
    queue = JobQueue()
    t = time.perf_counter()
    queue.extend(jobs, payloads)
    while queue.live:
        queue.take(N, MAX_BATCH_BYTES)
    return (time.perf_counter() - t) / N


def channel_round(jobs: list[Job], payloads: list[bytes]) -> float:
    send, receive = trio.open_memory_channel[Job](float("inf"))
    batch_len = MAX_BATCH_BYTES // len(payloads[N // 2])
    t = time.perf_counter()
    for job in jobs:
        send.send_nowait(job)
    taken = 0
    while taken < N:
        batch = [receive.receive_nowait() for _ in range(min(batch_len, N - taken))]
        taken += len(batch)
    return (time.perf_counter() - t) / N


def channel_batched_round(jobs: list[Job], payloads: list[bytes]) -> float:
    send, receive = trio.open_memory_channel[list[Job]](float("inf"))
    batch_len = MAX_BATCH_BYTES // len(payloads[N // 2])
    t = time.perf_counter()
    for start in range(0, N, batch_len):
        send.send_nowait(jobs[start : start + batch_len])
    taken = 0
    while taken < N:
        taken += len(receive.receive_nowait())
    return (time.perf_counter() - t) / N


def main() -> dict[str, float]:
    jobs, payloads = _jobs()
    rounds: dict[str, Callable[[list[Job], list[bytes]], float]] = {
        "jobqueue": jobqueue_round,
        "channel": channel_round,
        "channel_batched": channel_batched_round,
    }
    samples: dict[str, list[float]] = {name: [] for name in rounds}

    async def run() -> None:
        for _ in range(ROUNDS):  # alternately, so that drift hits all alike
            for name, fn in rounds.items():
                samples[name].append(fn(jobs, payloads))
                await trio.lowlevel.checkpoint()

    trio.run(run)
    out = {f"{name}_ns_per_action": statistics.median(s) * 1e9 for name, s in samples.items()}
    (RESULTS / "queue_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key:32} {value:8.1f}")
    sys.exit(0)
