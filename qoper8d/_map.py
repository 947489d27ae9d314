"""`Pool.map()`: an ordered async iterator with backpressure and no task of its own.

The consumer drives everything: each step tops the window up from the source (one dispatch
for the whole refill), then takes the next result in order. The iterator is itself the sink
of its jobs, so answers land in a dict by position and the consumer is woken only when the
position it waits for arrives — once per batch in bulk, not once per action.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import trio

from qoper8d._jobs import Job, decode_json
from qoper8d.errors import ActionError, QueueFull

if TYPE_CHECKING:
    from qoper8d._engine import Engine, Worker

__all__ = ["MapIterator"]


class MapIterator:
    """The async iterator `Pool.map()` returns; see there."""

    def __init__(
        self,
        engine: Engine,
        actions: Iterable[Any] | AsyncIterable[Any],
        window: int,
        return_exceptions: bool,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._engine = engine
        self._source: Iterable[Any] | None = None
        self._source_async: AsyncIterator[Any] | None = None
        if isinstance(actions, AsyncIterable):
            self._source_async = aiter(actions)
        else:
            self._source = iter(actions)
        self._window = window
        self._return_exceptions = return_exceptions
        self._next = 0  # position of the next result to hand out
        self._issued = 0  # actions submitted so far
        self._results: dict[int, Any] = {}
        self._task: trio.lowlevel.Task | None = None
        self._exhausted = False
        self._closed = False

    # -- the sink side, called by the engine ---------------------------------------------

    def result(self, job: Job, payload: bytes, worker: Worker) -> None:
        self._results[job.tag] = payload
        if job.tag == self._next and self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task)

    def error(self, job: Job, err: ActionError, worker: Worker | None) -> None:
        self._results[job.tag] = err
        if job.tag == self._next and self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task)

    # -- the consumer side ---------------------------------------------------------------

    def __aiter__(self) -> MapIterator:
        return self

    async def _refill(self) -> None:
        engine = self._engine
        outstanding = self._issued - self._next
        room = self._window - outstanding
        if self._exhausted or room < (self._window + 1) // 2:
            return
        engine.check_accepting(0)
        room = min(room, engine.config.max_queue - engine.queued)
        if room <= 0:
            if outstanding:
                return
            raise QueueFull(f"the queue is full (pool.max_queue = {engine.config.max_queue})")
        encode = engine.encode
        payloads: list[bytes] = []
        if self._source is not None:
            for action in self._source:
                payloads.append(encode(action))
                if len(payloads) >= room:
                    break
            else:
                self._exhausted = True
        else:
            assert self._source_async is not None
            while len(payloads) < room:
                try:
                    action = await anext(self._source_async)
                except StopAsyncIteration:
                    self._exhausted = True
                    break
                payloads.append(encode(action))
        if not payloads:
            return
        index = self._issued
        timeout = engine.config.action_timeout
        jobs = [Job(payload, self, index + i, timeout) for i, payload in enumerate(payloads)]
        self._issued = index + len(jobs)
        engine.submit_many(jobs)

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        await self._refill()
        index = self._next
        if index >= self._issued:
            self._closed = True
            raise StopAsyncIteration
        results = self._results
        if index in results:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            self._task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            try:
                await trio.lowlevel.wait_task_rescheduled(abort)
            except BaseException:
                self._withdraw()
                raise
        value = results.pop(index)
        self._next = index + 1
        if type(value) is bytes:
            return decode_json(value)
        if self._return_exceptions:
            return value
        self._withdraw()
        raise value

    def _withdraw(self) -> None:
        """Stop early: take back what is still queued, drop answers still to come."""
        if not self._closed:
            self._closed = True
            self._engine.withdraw(self)
            self._results.clear()

    async def aclose(self) -> None:
        """Stop early (also what leaving `async with aclosing(...)` does)."""
        self._withdraw()
        await trio.lowlevel.checkpoint()
