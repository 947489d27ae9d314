"""`Pool.map()`: an ordered async iterator with backpressure and no task of its own.

The consumer drives everything: each step tops the window up from the source (one dispatch
for the whole refill), then takes the next result in order. The iterator is itself the sink
of its jobs, so answers land in a dict by position and the consumer is woken only when the
position it waits for arrives — once per batch in bulk, not once per action.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from itertools import count, islice, repeat
from operator import attrgetter
from typing import Any

import msgspec
import trio

from qoper8d._engine import Engine
from qoper8d._jobs import Answerer, Job, decode_json, encode_action, encode_json
from qoper8d._wakeup import Wakeup
from qoper8d.errors import ActionError, QueueFull

__all__ = ["MapIterator"]

_MISSING: Any = object()
#: The most actions one step of the iterator encodes and queues.
_REFILL = 16384


class _Failed:
    """An error outcome in the results, told apart from a result by its type alone."""

    __slots__ = ("error",)

    def __init__(self, error: ActionError) -> None:
        self.error = error


_tag_of = attrgetter("tag")


def _unhooked(agen: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """`agen`, kept out of the event loop's async generator hooks.

    `_iterate` holds nothing to clean up: no `finally`, and it is only ever suspended at a
    `yield` when nobody is stepping it. Left behind after a `break`, it can simply be dropped,
    as CPython does with a generator no hook claims; Trio's hook would instead warn that it
    was not closed and spawn a task to close it. A generator takes the hooks in force when it
    is first stepped: creating (and dropping) its first step with none installed settles it.
    """
    hooks = sys.get_asyncgen_hooks()
    sys.set_asyncgen_hooks(None, None)
    try:
        agen.asend(None).close()  # the step never runs: only the hooks are settled
    finally:
        sys.set_asyncgen_hooks(*hooks)
    return agen


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
        #: Refill when fewer than this many actions are outstanding.
        self._low = (window + 1) // 2
        #: The most results `async for` takes in one step (the window is topped up between).
        self._chunk = max(1, window // 8)
        self._return_exceptions = return_exceptions
        self._next = 0  # position of the next result to hand out
        self._issued = 0  # actions submitted so far
        # Results arrive in runs: the answers one read brought from one worker's batch, for
        # consecutive positions. A run is kept as a list by its first position, and the one
        # being handed out is `_run` (positions `_run_start` to `_run_end`), so handing out a
        # result is a list index, not a dict insert and pop. Anything else (an error, a
        # lone result, a run broken by a retry) goes in `_results` by position.
        self._runs: dict[int, list[Any]] = {}
        self._run: list[Any] = []
        self._run_start = self._run_end = 0
        self._results: dict[int, Any] = {}
        self._wakeup = Wakeup()
        self._exhausted = False
        self._closed = False

    # -- the sink side, called by the engine ---------------------------------------------

    def result(self, job: Job, payload: msgspec.Raw, worker: Answerer) -> None:
        self._results[job.tag] = decode_json(payload)
        if job.tag == self._next:
            self._wakeup.wake()

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Answerer) -> None:
        # One decode for the whole run of results: they are JSON texts, so joined with
        # commas inside brackets they are one JSON array.
        self.decoded(jobs, decode_json(b"[%b]" % b",".join(payloads)), worker)

    def decoded(self, jobs: list[Job], values: list[Any], worker: Answerer) -> None:
        """The results of `jobs`, decoded (the engine's bulk path)."""
        first = jobs[0].tag
        # A worker's batch holds this map's jobs in increasing position, unless some were
        # put back in the queue after a worker died (`replayed`): then first and last alone
        # do not prove that the positions are consecutive.
        if jobs[-1].tag - first == len(jobs) - 1 and not worker.replayed:
            self._runs[first] = values
            ready = first == self._next
        else:
            self._results.update(zip(map(_tag_of, jobs), values, strict=True))
            ready = self._next in self._results
        if ready:
            self._wakeup.wake()

    def error(self, job: Job, err: ActionError, worker: Answerer | None) -> None:
        self._results[job.tag] = _Failed(err)
        if job.tag == self._next:
            self._wakeup.wake()

    # -- the consumer side ---------------------------------------------------------------

    async def _refill(self) -> None:
        engine = self._engine
        outstanding = self._issued - self._next
        room = self._window - outstanding
        engine.check_accepting(0)
        # In slices, so that a huge window never holds the event loop for long.
        room = min(room, engine.config.max_queue - engine.queue.live, _REFILL)
        if engine.queue.bytes >= engine.config.max_queue_bytes:
            room = 0
        if room <= 0:
            if outstanding:
                return
            raise QueueFull(f"the queue is full (pool.max_queue = {engine.config.max_queue})")
        encode = encode_action
        if self._source is not None:
            actions = list(islice(self._source, room))
            if len(actions) < room:
                self._exhausted = True
            try:
                payloads = list(map(encode_json, actions))
            except (TypeError, ValueError, OverflowError):
                payloads = list(map(encode, actions))  # raises BadRequest for the culprit
        else:
            assert self._source_async is not None
            payloads = []
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
        jobs = list(
            map(Job, payloads, repeat(self), count(index), repeat(engine.config.action_timeout))
        )
        self._issued = index + len(jobs)
        engine.submit_many(jobs, payloads)

    def __aiter__(self) -> AsyncGenerator[Any, None]:
        return _unhooked(self._iterate())

    async def _iterate(self) -> AsyncGenerator[Any, None]:
        # `async for` resumes this generator, which hands out a run of ready results per
        # step: a result costs half of what an `async def __anext__` call would. Positions
        # advance as results are handed out, so a loop that breaks and a later one that
        # resumes the iterator lose nothing between them.
        step = self._step
        most = self._chunk
        while True:
            try:
                values = await step(most)
            except StopAsyncIteration:
                return
            for value in values:
                self._next += 1
                yield value

    async def __anext__(self) -> Any:
        """The next result (`anext()`); `async for` takes them a run at a time instead."""
        value = (await self._step(1))[0]
        self._next += 1
        return value

    async def _step(self, most: int) -> list[Any]:
        """The next results in order, from `_next` on: at least one, at most `most`.

        Does not advance `_next`: the caller does, as it hands each one out. A ready result
        is handed out without a checkpoint: the consumer parks (and so checkpoints) whenever
        it waits, which in bulk is about once per batch.
        """
        index = self._next
        if self._issued - index < self._low and not self._exhausted and not self._closed:
            await self._refill()
        if index >= self._run_end:
            value = self._take(index)
            while value is _MISSING and self._filling(index):
                # The result is not in yet: fill the window meanwhile, a slice at a time,
                # letting the pool read answers between slices.
                await self._refill()
                await trio.lowlevel.checkpoint()
                value = self._take(index)
            if value is _MISSING:
                if index >= self._issued or self._closed:
                    self._closed = True
                    raise StopAsyncIteration
                await self._wakeup.wait(self._withdraw)
                value = self._take(index)
            if index >= self._run_end:
                # A lone outcome, not the start of a run.
                if type(value) is not _Failed:
                    return [value]
                if self._return_exceptions:
                    return [value.error]
                self._next = index + 1
                self._withdraw()
                raise value.error
        first = self._run_start
        return self._run[index - first : min(self._run_end, index + most) - first]

    def _filling(self, index: int) -> bool:
        """Is there room in the window, and a source to fill it from?"""
        if self._exhausted or self._closed or self._issued - index >= self._window:
            return False
        queue = self._engine.queue
        cfg = self._engine.config
        return queue.live < cfg.max_queue and queue.bytes < cfg.max_queue_bytes

    def _take(self, index: int) -> Any:
        """The result at `index` if it has arrived (a run starting there becomes current)."""
        run = self._runs.pop(index, None)
        if run is not None:
            self._run, self._run_start, self._run_end = run, index, index + len(run)
            return run[0]
        return self._results.pop(index, _MISSING)

    def _withdraw(self) -> None:
        """Stop early: take back what is still queued, drop answers still to come."""
        if not self._closed:
            self._closed = True
            self._engine.withdraw(self)
            self._results.clear()
            self._runs.clear()
            self._run = []
            self._run_start = self._run_end = 0

    async def aclose(self) -> None:
        """Stop early (also what leaving `async with aclosing(...)` does)."""
        self._withdraw()
        await trio.lowlevel.checkpoint()
