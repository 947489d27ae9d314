"""The master's record of one worker process: its pipes, its batch in flight, its fate.

A `WorkerHandle` lives from the worker's ready handshake until its exit has been accounted
for. The engine reads and writes its fields on the hot path, so it is a plain `__slots__`
class with no behaviour of its own beyond `busy`.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING

import msgspec
import trio

from qoper8d import wire
from qoper8d._jobs import Job
from qoper8d._process import WorkerProcess
from qoper8d.config import PoolConfig
from qoper8d.errors import ActionError

if TYPE_CHECKING:
    from qoper8d._supervise import Slot

__all__ = ["EMPTY", "Discard", "WorkerHandle", "frame_limit"]

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

    def result(self, job: Job, payload: msgspec.Raw, worker: WorkerHandle) -> None:
        self.answers += 1

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: WorkerHandle) -> None:
        self.answers += len(jobs)

    def error(self, job: Job, err: ActionError, worker: WorkerHandle | None) -> None:
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
        "reader_task",
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

    def __init__(self, proc: WorkerProcess, slot: Slot, max_frame: int = wire.MAX_FRAME) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.wfd = proc.to_worker
        self.rfd = proc.from_worker
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        #: `poll(0)`: is an answer (or end-of-file) waiting? No exception, one syscall.
        self.poll = poller.poll
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
        #: The reader task while it is parked (nothing to read, or a caller reads for it).
        self.reader_task: trio.lowlevel.Task | None = None
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
        #: Why we are stopping it: "timeout", "cancelled", "stopping", "retired", "scaled
        #: down" or "protocol error".
        self.doom: str | None = None
        #: Why it should be replaced between actions, once asked (count or RSS limit).
        self.retire: str | None = None
        #: Set when it asks to retire or once it has exited: its slot acts on either.
        self.attention = trio.Event()
        #: Set, for whoever waits to retire it, when its batch ends or its session does.
        self.changed: trio.Event | None = None
        self.exited = trio.Event()
        #: It exited by itself, not because we stopped it.
        self.crashed = False

    @property
    def busy(self) -> bool:
        return self.pos < len(self.inflight)
