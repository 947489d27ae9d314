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

from qoper8d._wakeup import Wakeup
from qoper8d.errors import ActionError, BadRequest

__all__ = ["Answerer", "Job", "Sink", "Waiter", "decode_json", "encode_action", "encode_json"]

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


class Waiter:
    """The sink of a single `pool.run()`: holds the outcome and wakes the one waiting task."""

    __slots__ = ("done", "err", "payload", "pid", "wakeup")

    def __init__(self) -> None:
        self.wakeup = Wakeup()
        self.done = False
        self.payload: msgspec.Raw | None = None
        self.err: ActionError | None = None
        self.pid: int | None = None

    def result(self, job: Job, payload: msgspec.Raw, worker: Answerer) -> None:
        self.payload = payload
        self.pid = worker.pid
        self.done = True
        self.wakeup.wake()

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Answerer) -> None:
        for job, payload in zip(jobs, payloads, strict=True):
            self.result(job, payload, worker)

    def error(self, job: Job, err: ActionError, worker: Answerer | None) -> None:
        self.err = err
        self.pid = worker.pid if worker is not None else None
        self.done = True
        self.wakeup.wake()

    async def wait(self, on_abort: Callable[[], None]) -> None:
        """Park until the outcome arrives; `on_abort` runs if the waiting task is cancelled."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        await self.wakeup.wait(on_abort)

    def outcome(self) -> Any:
        if self.err is not None:
            raise self.err
        assert self.payload is not None
        return decode_json(self.payload)
