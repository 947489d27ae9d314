"""Accepted actions and where their outcomes go.

A `Job` is one accepted action: its JSON payload, the sink that receives its one outcome,
and how often it may have run. Sinks are deliberately small and synchronous: the reader calls
`sink.result()` / `sink.error()` for each answered action and they only store the outcome and,
at most, wake one waiting task. Nothing here awaits, so a whole read's worth of outcomes is
delivered in one go and a consumer is resumed once per batch, not once per action.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from qoper8d.errors import ActionError

if TYPE_CHECKING:
    from qoper8d.pool import _Worker

__all__ = ["Job", "Sink", "Waiter"]

decode_json: Callable[[bytes], Any] = msgspec.json.Decoder().decode


class Sink(Protocol):
    def result(self, job: Job, payload: bytes, worker: _Worker) -> None:
        """The action returned; `payload` is the result as JSON text."""

    def error(self, job: Job, err: ActionError, worker: _Worker | None) -> None:
        """The action ended with an error outcome (`worker` is None if it never ran)."""


class Job:
    """One accepted action, queued or running, until its single outcome is delivered."""

    __slots__ = ("cancelled", "deaths", "payload", "runs", "sink", "tag", "timeout")

    def __init__(self, payload: bytes, sink: Sink, tag: Any = None, timeout: float = 0.0) -> None:
        self.payload = payload
        self.sink = sink
        #: The sink's own reference for this job (a position in a map, a request, an id).
        self.tag = tag
        #: Seconds it may run for once started; 0 for no limit.
        self.timeout = timeout
        #: Times it may have run (answered, or the first unanswered action of a dead worker).
        self.runs = 0
        #: Workers that died while running it.
        self.deaths = 0
        #: Removed from the queue: dispatch skips it (the queue is cleaned lazily).
        self.cancelled = False


class Waiter:
    """The sink of a single `pool.run()`: holds the outcome and wakes the one waiting task."""

    __slots__ = ("done", "err", "payload", "pid", "task")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.done = False
        self.payload = b""
        self.err: ActionError | None = None
        self.pid: int | None = None

    def result(self, job: Job, payload: bytes, worker: _Worker) -> None:
        self.payload = payload
        self.pid = worker.pid
        self._wake()

    def error(self, job: Job, err: ActionError, worker: _Worker | None) -> None:
        self.err = err
        self.pid = worker.pid if worker is not None else None
        self._wake()

    def _wake(self) -> None:
        self.done = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    async def wait(self, on_abort: Callable[[], None]) -> None:
        """Park until the outcome arrives; `on_abort` runs if the waiting task is cancelled."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None
            on_abort()
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def outcome(self) -> Any:
        if self.err is not None:
            raise self.err
        return decode_json(self.payload)
