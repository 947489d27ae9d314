"""Soak: 200,000+ actions through the daemon's socket while workers are SIGKILLed every 50 ms.

The client keeps sending past 200,000 actions until at least `MIN_KILLS` workers have been
killed (a fast daemon gets through 200,000 trivial actions in a couple of seconds, which is
too few faults to call a soak), within a time budget.

Nothing may be lost: every id gets exactly one response, a result (`x + 1`) or, only once an
action's attempts ran out, `worker_lost`. At the end the pool is back to full size and idle,
its counters match what the client saw, and the master's RSS has stayed flat.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Connection, running_daemon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ACTIONS = 200_000  # at least
MIN_KILLS = 200  # at least, unless the sending budget runs out first
SEND_BUDGET = 30.0  # seconds: stop adding actions after this, whatever the counts
MAX_ACTIONS = 10_000_000
KILL_EVERY = 0.05  # seconds
MAX_ATTEMPTS = 3
WINDOW = 8_000  # actions in flight on the connection
CHUNK = 1_000
WARM_UP = 20_000  # answers before the first RSS reading


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Killer:
    """SIGKILLs a random worker of the pool every `KILL_EVERY` seconds until stopped."""

    def __init__(self, socket: Path) -> None:
        self.conn = Connection(socket)
        self.kills = 0
        self.missed = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._rng = random.Random(6)
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            n = 0
            # The fault injector's pacing is the one time-based wait allowed here.
            while not self._stop.wait(KILL_EVERY):
                n += 1
                status = self.conn.request({"id": n, "op": "status"})["result"]
                pids = [w["pid"] for w in status["workers"] if w["pid"] is not None]
                if not pids:
                    self.missed += 1
                    continue
                try:
                    os.kill(self._rng.choice(pids), signal.SIGKILL)
                except ProcessLookupError:
                    self.missed += 1
                else:
                    self.kills += 1
        except BaseException as exc:
            self.failure = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.conn.close()
        if self.failure is not None:
            raise self.failure


class Pipeline:
    """Sends `{"x": i}` submits on one connection, keeping `WINDOW` in flight, and reads the
    answers: one count per id, the wrong ones and the lost ones kept aside."""

    def __init__(self, conn: Connection, killer: Killer) -> None:
        self.conn = conn
        self.killer = killer
        self.answers = bytearray(MAX_ACTIONS)  # responses per id
        self.lost: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []
        self.sent = 0
        self.received = 0
        #: How many were sent in all, once the sender is done.
        self.total: int | None = None
        self.failure: BaseException | None = None
        self.changed = threading.Condition()
        self.started = time.monotonic()
        self._sender = threading.Thread(target=self._send, name="sender", daemon=True)

    def _more(self) -> bool:
        if self.sent >= MAX_ACTIONS or time.monotonic() - self.started > SEND_BUDGET:
            return False
        return self.sent < ACTIONS or self.killer.kills < MIN_KILLS

    def _room(self) -> bool:
        return self.sent - self.received <= WINDOW - CHUNK

    def _send(self) -> None:
        try:
            while self._more():
                with self.changed:
                    assert self.changed.wait_for(self._room, 60), "the daemon stopped answering"
                end = min(MAX_ACTIONS, self.sent + CHUNK)
                self.conn.sock.sendall(
                    b"".join(
                        b'{"id":%d,"op":"submit","action":{"x":%d},"max_attempts":%d}\n'
                        % (i, i, MAX_ATTEMPTS)
                        for i in range(self.sent, end)
                    )
                )
                self.sent = end
        except BaseException as exc:
            self.failure = exc
        finally:
            with self.changed:
                self.total = self.sent
                self.changed.notify_all()

    def run(self, on_answer: Callable[[int], None]) -> None:
        """Send and read until every action sent has its answer."""
        self._sender.start()
        try:
            while self.total is None or self.received < self.total:
                line = self.conn._file.readline()
                assert line, f"the connection closed after {self.received} responses"
                self._answer(json.loads(line))
                with self.changed:
                    self.received += 1
                    if self.received & 1023 == 0:
                        self.changed.notify_all()
                on_answer(self.received)
        finally:
            with self.changed:
                self.received = MAX_ACTIONS  # release the sender if we stop early
                self.changed.notify_all()
            self._sender.join(10)
        if self.failure is not None:
            raise self.failure

    def _answer(self, response: dict[str, Any]) -> None:
        i = response["id"]
        self.answers[i] += 1
        if response["ok"]:
            if response["result"] != i + 1:
                self.wrong.append(response)
            return
        error = response["error"]
        if error["code"] == "worker_lost" and error["attempts"] == MAX_ATTEMPTS:
            self.lost.append(response)  # only once its attempts ran out
        else:
            self.wrong.append(response)

    def check(self) -> int:
        """Every id sent answered exactly once, correctly; the number sent."""
        total = self.total
        assert total is not None
        duplicates = [i for i, n in enumerate(self.answers[:total]) if n > 1]
        missing = [i for i, n in enumerate(self.answers[:total]) if n == 0]
        strays = [i for i, n in enumerate(self.answers[total:], total) if n]
        assert duplicates == [], f"ids answered more than once: {duplicates[:10]}"
        assert missing == [], f"ids never answered: {missing[:10]}"
        assert strays == [], f"answers to ids never sent: {strays[:10]}"
        assert self.wrong == [], self.wrong[:5]
        return total


def test_soak_no_action_lost_while_workers_are_killed(short_tmp: Path) -> None:
    with running_daemon(
        short_tmp,
        pool={
            "size": 2,
            "handler": "handlers.echo:plus_one",
            "max_attempts": MAX_ATTEMPTS,
            "poison_threshold": 100,  # attempts run out first: worker_lost, never poisoned
        },
        supervisor={"max_restarts": 1_000_000, "restart_window": 60.0, "backoff_initial": 0.0},
    ) as d:
        rss: dict[str, int] = {}

        def warmed_up(received: int) -> None:
            if received == WARM_UP:
                rss["before"] = rss_bytes(d.proc.pid)

        with Connection(d.socket, timeout=30) as conn, Connection(d.socket) as watch:
            baseline = watch.request({"id": 0, "op": "status"})["result"]
            killer = Killer(d.socket)
            pipeline = Pipeline(conn, killer)
            killer.start()
            try:
                pipeline.run(warmed_up)
            finally:
                killer.stop()
            seconds = time.monotonic() - pipeline.started
            total = pipeline.check()
            # The pool is whole again: every slot has a live, idle worker.
            deadline = time.monotonic() + 20
            while True:
                status = watch.request({"id": 1, "op": "status"})["result"]
                workers = status["workers"]
                if all(w["pid"] is not None and w["state"] == "idle" for w in workers):
                    break
                assert time.monotonic() < deadline, f"the pool did not recover: {workers}"
            rss["after"] = rss_bytes(d.proc.pid)
        outcomes = status["outcomes"]
        submitted = status["submitted"] - baseline["submitted"]
        restarts = status["restarts"] - baseline["restarts"]
        lost = len(pipeline.lost)
        print(
            f"\nsoak: {total:,} actions, {killer.kills} workers SIGKILLed "
            f"({killer.missed} kills missed), {restarts} restarts, lost=0, "
            f"worker_lost after {MAX_ATTEMPTS} attempts={lost}, {seconds:.1f} s "
            f"({total / seconds:,.0f} actions/s), master RSS {rss['before'] / 2**20:.1f} MiB "
            f"-> {rss['after'] / 2**20:.1f} MiB "
            f"({(rss['after'] / rss['before'] - 1) * 100:+.1f}%)"
        )
        assert total >= ACTIONS
        assert len(workers) == 2
        assert submitted == total == sum(outcomes.values())
        assert outcomes["result"] == total - lost
        assert outcomes["worker_lost"] == lost
        assert killer.kills >= seconds / KILL_EVERY / 4, "the fault injector kept up"
        assert killer.kills * 0.95 <= restarts <= killer.kills
        assert rss["after"] < rss["before"] * 1.10, rss
