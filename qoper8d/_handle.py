"""The master's record of one worker process: its channel, its batch in flight, its fate.

A `WorkerHandle` lives from the worker's ready handshake until its exit has been accounted
for. Its fields have one writer each, and the contract is this:

- what the process is (`proc`, `pid`, the channel's descriptors, `slot`) never changes;
- the dispatch state (`inflight`, `pos`, `seq`, `head_started`, `timed`, `borrowed`,
  `reserved`, `eof`, `unsent`, `outbuf`, `answered`, `dead`) belongs to the engine, which
  reads and writes it on its hot path as plain attributes;
- its fate changes only through methods: `doom_as()` (why we stop it: the first reason
  wins), `ask_retire()` (replace it between actions), `exited_as()` (it is gone), and
  `unanswered()` (what it leaves behind).

Nothing here knows of slots, queues or supervisors: the handle is below all of them.
"""

from __future__ import annotations

import math
import os
import select
from typing import Literal

import msgspec
import trio

from qoper8d import wire
from qoper8d._jobs import Answerer, Job
from qoper8d._process import WorkerProcess
from qoper8d._wakeup import Wakeup
from qoper8d.config import PoolConfig
from qoper8d.errors import ActionError

__all__ = ["EMPTY", "Discard", "Doom", "WorkerHandle", "frame_limit"]

#: Why the pool stops a worker; none means it exited by itself (a crash).
Doom = Literal[
    "timeout",  # its running action passed its time limit
    "cancelled",  # its running action was cancelled
    "stopping",  # the pool is stopping
    "retired",  # replaced between actions (its action count or memory limit, a reload)
    "scaled down",
    "protocol error",  # it sent something that is not a valid frame: killed, never reused
]

#: The batch of a worker with nothing in flight (shared, never mutated).
EMPTY: list[Job] = []


def frame_limit(config: PoolConfig) -> int:
    """The longest frame an honest worker sends: a result of `pool.max_result_bytes`, or an
    exception's text (bounded by the worker), with room to spare. A longer one is a protocol
    error, so a worker can never make the master buffer more than this."""
    return config.max_result_bytes + (1 << 20)


class Discard:
    """The sink of a job whose outcome was already delivered (cancelled or timed out).

    Its answer may still arrive (it was in a worker's batch already); it is dropped, and
    counted so that statistics do not count it as a result as well.
    """

    __slots__ = ("answers",)

    def __init__(self) -> None:
        self.answers = 0

    def result(self, job: Job, payload: msgspec.Raw, worker: Answerer) -> None:
        self.answers += 1

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Answerer) -> None:
        self.answers += len(jobs)

    def error(self, job: Job, err: ActionError, worker: Answerer | None) -> None:
        self.answers += 1


class WorkerHandle:
    """One worker process, from its ready handshake until its exit has been accounted for."""

    __slots__ = (
        "answered",
        "attention",
        "borrowed",
        "changed",
        "crashed",
        "dead",
        "doom",
        "eof",
        "exited",
        "frames",
        "head_started",
        "inflight",
        "outbuf",
        "pid",
        "poll",
        "pos",
        "proc",
        "reader",
        "ready_at",
        "replayed",
        "reserved",
        "retire",
        "rfd",
        "seq",
        "slot",
        "timed",
        "timer",
        "unsent",
        "wfd",
    )

    def __init__(self, proc: WorkerProcess, slot: int, max_frame: int = wire.MAX_FRAME) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.wfd = proc.to_worker
        self.rfd = proc.from_worker
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        #: `poll(0)`: is an answer (or end-of-file) waiting? No exception, one syscall.
        self.poll = poller.poll
        #: The number of the pool's slot it serves in (for logs and statistics).
        self.slot = slot
        self.frames = wire.FrameReader(wire.FromWorker, max_frame=max_frame)
        #: The batch in flight, and how many of its actions have been answered.
        self.inflight: list[Job] = EMPTY
        self.pos = 0
        #: The batch in flight holds jobs put back in the queue after a worker died, so one
        #: sink's jobs in it may be out of their submission order.
        self.replayed = False
        self.seq = 0
        #: Actions this process has answered.
        self.answered = 0
        #: When the action now running started: its predecessor's answer, or the send.
        self.head_started = 0.0
        self.ready_at = 0.0
        #: The batch in flight holds an action with a time limit; `timer` enforces it.
        self.timed = False
        self.timer: trio.CancelScope | None = None
        #: The reader task, parked while there is nothing to read or a caller reads for it.
        self.reader = Wakeup()
        #: A caller on the idle fast path is reading this worker's answers itself.
        self.borrowed = False
        #: Held by a session: it takes work from that session only.
        self.reserved = False
        self.eof = False
        #: Frame bytes the pipe did not take yet; a flush task owns them.
        self.outbuf = b""
        #: The last batch never reached the worker (the send failed): none of it ran.
        self.unsent = False
        #: Takes no more work: exited, or being stopped.
        self.dead = False
        #: Why we stop it, once we do (see `Doom`); None while it lives, or if it crashed.
        self.doom: Doom | None = None
        #: Why it should be replaced between actions, once asked (count or memory limit).
        self.retire: str | None = None
        #: Set when it asks to retire or once it has exited: its slot acts on either.
        self.attention = trio.Event()
        #: Woken when its batch ends, its session ends or it exits (whoever waits to
        #: retire it).
        self.changed = Wakeup()
        self.exited = trio.Event()
        #: It exited by itself (or broke the protocol), not because we stopped it.
        self.crashed = False

    @property
    def busy(self) -> bool:
        return self.pos < len(self.inflight)

    def deadline(self) -> float:
        """When the action now running passes its time limit (inf: never)."""
        if self.pos < len(self.inflight):
            limit = self.inflight[self.pos].timeout
            if limit > 0:
                return self.head_started + limit
        return math.inf

    def doom_as(self, doom: Doom) -> None:
        """Record why we stop it; the first reason given stands."""
        if self.doom is None:
            self.doom = doom

    def ask_retire(self, reason: str) -> None:
        """Ask for it to be replaced between actions (its slot does it)."""
        if self.retire is None:
            self.retire = reason
            self.attention.set()

    def unanswered(self) -> list[Job]:
        """The jobs of its batch not answered yet; the batch is over."""
        pending = self.inflight[self.pos :]
        self.inflight = EMPTY
        self.pos = 0
        return pending

    def close(self) -> None:
        """Close our ends of its channel, waking with `ClosedResourceError` any task still
        waiting on them."""
        for fd in (self.rfd, self.wfd):
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def exited_as(self, crashed: bool) -> None:
        """It is gone and accounted for: whoever waits on it hears so."""
        self.crashed = crashed
        self.exited.set()
        self.attention.set()
        self.changed.wake()

    def __repr__(self) -> str:
        return f"<worker {self.pid} in slot {self.slot}>"
