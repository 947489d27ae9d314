"""Accepted actions and where their outcomes go.

A `Job` is one accepted action: its JSON payload, the sink that receives its one outcome,
and how often it may have run. Sinks are deliberately small and synchronous: the reader calls
`sink.result()` / `sink.error()` for each answered action and they only store the outcome and,
at most, wake one waiting task. Nothing here awaits, so a whole read's worth of outcomes is
delivered in one go and a consumer is resumed once per batch, not once per action.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import trio

from qoper8d.errors import ActionError, BadRequest

__all__ = [
    "Answerer",
    "Canceller",
    "Job",
    "Sink",
    "Waiter",
    "decode_json",
    "encode_action",
    "encode_json",
]

decode_json: Callable[[bytes | msgspec.Raw], Any] = msgspec.json.Decoder().decode
encode_json: Callable[[Any], bytes] = msgspec.json.Encoder().encode


def encode_action(action: Any) -> bytes:
    """An action as the JSON text a worker gets; `BadRequest` if JSON cannot hold it."""
    try:
        return encode_json(action)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"the action is not JSON-compatible: {exc}") from None
    except RecursionError:
        raise BadRequest("the action is nested too deeply to encode") from None


class Answerer(Protocol):
    """What a sink may know of the worker that answered (the pool's `WorkerHandle`)."""

    #: The worker process's pid.
    pid: int
    #: Its batch held jobs put back after another worker died: one sink's jobs in it may be
    #: out of their submission order.
    replayed: bool


class Sink(Protocol):
    def result(self, job: Job, payload: msgspec.Raw, worker: Answerer) -> None:
        """The action returned; `payload` is the result as raw JSON text."""

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Answerer) -> None:
        """Several actions, all of this sink, returned: `result()` for each, in one call.

        A sink that wants results decoded may also define `decoded(jobs, values, worker)`:
        the engine then calls that instead, with the run decoded in one go."""

    def error(self, job: Job, err: ActionError, worker: Answerer | None) -> None:
        """The action ended with an error outcome (`worker` is None if it never ran)."""


class Job(msgspec.Struct, gc=False, eq=False):
    """One accepted action, queued or running, until its single outcome is delivered.

    A msgspec Struct without GC tracking: created once per action in bulk paths, it costs a
    third of a plain class. Nothing a job refers to refers back to it, so no cycle is lost.
    Jobs compare by identity (`eq=False`): two equal actions are still two jobs.
    """

    #: The action as JSON text.
    payload: bytes
    sink: Sink
    #: The sink's own reference for this job (a position in a map, a request, an id).
    tag: Any = None
    #: Seconds it may run once started; 0 for no limit.
    timeout: float = 0.0
    #: Times it may have run (answered, or the first unanswered action of a dead worker).
    runs: int = 0
    #: Workers that died while running it.
    deaths: int = 0
    #: Taken out of the queue: dispatch skips it (the queue is cleaned lazily).
    cancelled: bool = False
    #: Runs allowed after worker deaths, for this job; 0: `pool.max_attempts`.
    max_attempts: int = 0


class Canceller(Protocol):
    """What withdraws a job whose waiting caller was cancelled (the pool's `Engine`)."""

    def cancel(self, job: Job) -> None: ...


class Waiter:
    """The sink of a single `pool.run()`: holds the outcome and wakes the one waiting task.

    Kept lean on purpose: a burst of one-shot calls parks thousands of these at once, and
    every object a parked call keeps alive is one more for each garbage collection to walk
    (20,000 calls started at once spent 40% of their time in the collector). So the waiter
    parks its task with trio itself (no `Wakeup`, no coroutine layer) and holds the engine
    and job it cancels on abort as two plain references, cleared when the wait ends: the
    job refers back to its waiter, and a `Job` is not tracked by the collector, so this
    cycle must be broken by hand, which every way out of the wait does.
    """

    __slots__ = ("_canceller", "_job", "_task", "done", "err", "payload", "pid")

    def __init__(self) -> None:
        self.done = False
        self.payload: msgspec.Raw | None = None
        self.err: ActionError | None = None
        self.pid: int | None = None
        #: The parked task, and what its abort cancels, while one waits.
        self._task: trio.lowlevel.Task | None = None
        self._canceller: Canceller | None = None
        self._job: Job | None = None

    def result(self, job: Job, payload: msgspec.Raw, worker: Answerer) -> None:
        self.payload = payload
        self.pid = worker.pid
        self.done = True
        self.wake()

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Answerer) -> None:
        for job, payload in zip(jobs, payloads, strict=True):
            self.result(job, payload, worker)

    def error(self, job: Job, err: ActionError, worker: Answerer | None) -> None:
        self.err = err
        self.pid = worker.pid if worker is not None else None
        self.done = True
        self.wake()

    def is_done(self) -> bool:
        return self.done

    async def wait(self, canceller: Canceller | None = None, job: Job | None = None) -> None:
        """Park until `wake()` (an outcome arrives, or a subclass's news); returns at once,
        after a checkpoint, if the outcome is in. If the waiting task is cancelled meanwhile,
        `canceller.cancel(job)` runs before the cancellation is raised here."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        self._canceller, self._job = canceller, job
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def wake(self) -> None:
        """Reschedule the waiting task, if one waits."""
        task = self._task
        if task is not None:
            self._task = self._canceller = self._job = None
            trio.lowlevel.reschedule(task)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        canceller, job = self._canceller, self._job
        self._task = self._canceller = self._job = None
        if canceller is not None and job is not None:
            canceller.cancel(job)
        return trio.lowlevel.Abort.SUCCEEDED

    def outcome(self) -> Any:
        if self.err is not None:
            raise self.err
        assert self.payload is not None
        return decode_json(self.payload)
