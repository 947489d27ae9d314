"""Fake worker processes for timing tests on trio's autojump clock.

A fake worker is a trio task in the test process that speaks the real wire protocol over
real pipes, so the pool under test runs its ordinary code; only the process is pretend.
Each one lives `lifetime` seconds of (virtual) time after its handshake, then "exits" with
`exit_code`, unless the pool signals it first. It answers `{"x": n}` with n, after
`action["seconds"]` of virtual time if the action says so, and notes when it answered. Like
a real worker, it times its actions and sends their `Timed` frame with its first answer
`wire.REPORT_INTERVAL` or more after the previous one (the first answer of all included).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from qoper8d import wire
from qoper8d._process import ExitStatus

FAKE_PID_BASE = 10_000_000  # above any real pid_max, so /proc never has these


class FakeWorker:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        batches_r, self.to_worker = os.pipe()
        self.from_worker, answers_w = os.pipe()
        os.set_blocking(self.to_worker, False)
        os.set_blocking(self.from_worker, False)
        self._worker_fds = (batches_r, answers_w)
        self.output: dict[str, int] = {}
        #: When (virtual time) it wrote each answer.
        self.answered_at: list[float] = []
        # Actions timed since the last `Timed` frame: per bucket, and in all (ns).
        self._counts: dict[int, int] = {}
        self._total = 0
        self._report_at = 0.0
        self._done = trio.Event()
        self._status = ExitStatus()
        self._scope = trio.CancelScope()

    async def wait(self) -> ExitStatus:
        await self._done.wait()
        return self._status

    def signal(self, signum: int) -> None:
        if not self._done.is_set():
            self._status = ExitStatus(signal=signum)
            self._scope.cancel()

    async def serve(self, lifetime: float, exit_code: int) -> None:
        batches_r, answers_w = self._worker_fds
        reader = wire.FrameReader(wire.FromMaster)
        answers = trio.lowlevel.FdStream(answers_w)
        batches = trio.lowlevel.FdStream(batches_r)
        try:
            with self._scope:
                await answers.send_all(wire.encode_frame(wire.Ready(self.pid)))
                with trio.move_on_after(lifetime):
                    while data := await batches.receive_some():
                        for message in reader.feed(data):
                            if isinstance(message, wire.Stop):
                                self._status = ExitStatus(exit_code=0)
                                return
                            for action in message.actions:
                                started = trio.current_time()
                                if "seconds" in action:
                                    await trio.sleep(action["seconds"])
                                frame = wire.encode_done(b"%d" % action["x"])
                                now = trio.current_time()
                                frame = self._timed(now, round((now - started) * 1e9)) + frame
                                await answers.send_all(frame)
                                self.answered_at.append(now)
                self._status = ExitStatus(exit_code=exit_code)
        finally:
            with trio.CancelScope(shield=True):
                await answers.aclose()
                await batches.aclose()
            self._done.set()

    def _timed(self, now: float, ns: int) -> bytes:
        """Count an action of `ns`; the `Timed` frame to send before its answer, if due."""
        bucket = wire.duration_bucket(ns)
        self._counts[bucket] = self._counts.get(bucket, 0) + 1
        self._total += ns
        if now < self._report_at:
            return b""
        pairs = [x for bucket in sorted(self._counts) for x in (bucket, self._counts[bucket])]
        frame = wire.encode_timed(self._total, pairs)
        self._counts.clear()
        self._total = 0
        self._report_at = now + wire.REPORT_INTERVAL
        return frame


class FakeLauncher:
    """Launches fake workers; `plan(n)` gives the n-th worker's (lifetime, exit code)."""

    def __init__(self, nursery: trio.Nursery, plan: Callable[[int], tuple[float, int]]) -> None:
        self._nursery = nursery
        self._plan = plan
        self.launched: list[float] = []
        self.workers: list[FakeWorker] = []
        self._launch = trio.Event()

    async def wait_launched(self, count: int) -> None:
        """Return once `count` workers have been launched."""
        while len(self.launched) < count:
            await self._launch.wait()

    async def start(self, nursery: trio.Nursery) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def launch(self, spec: wire.WorkerSpec) -> FakeWorker:
        n = len(self.launched)
        self.launched.append(trio.current_time())
        self._launch.set()
        self._launch = trio.Event()
        worker = FakeWorker(FAKE_PID_BASE + n)
        self.workers.append(worker)
        lifetime, exit_code = self._plan(n)
        self._nursery.start_soon(worker.serve, lifetime, exit_code)
        await trio.lowlevel.checkpoint()
        return worker
