"""Q-Oper8's master-side API: `add_to_queue(request, on_response)` and worker sessions.

In Q-Oper8 a request was an object whose `action` went to the child while everything else
stayed in the master, and `onResponse` ran in the master with the response and the child's
pid. Here the callbacks run in one task of the pool, a batch of answers at a time, so a slow
or failing callback never holds up reading answers; a callback may queue more actions.

Q-Oper8 also let a handler keep its child reserved and release it by hand. A session is that,
made safe: `async with pool.session() as worker` reserves one worker for a sequence of
actions and gives it back when the block ends, however it ends.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import structlog
import trio

from qoper8d._engine import Engine
from qoper8d._handle import WorkerHandle
from qoper8d._jobs import Answerer, Job, Waiter, decode_json, encode_action
from qoper8d._wakeup import Wakeup
from qoper8d.errors import ActionError, BadRequest, WorkerLost

__all__ = ["Callbacks", "OnResponse", "Session", "open_session"]

log = structlog.get_logger("qoper8d.pool")

#: `on_response(request, result, pid)`: `result` is the handler's result, or the
#: `ActionError` the action ended with; `pid` is the worker's, None if it never ran.
OnResponse = Callable[[dict[str, Any], Any, "int | None"], Any]


class Callbacks:
    """The sink of every `add_to_queue` action, and the task that runs their callbacks."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pending: deque[tuple[Job, Any, int | None]] = deque()
        self._wakeup = Wakeup()
        self._runner: trio.lowlevel.Task | None = None
        self._started = False
        #: Actions queued here whose callbacks have not finished yet.
        self.outstanding = 0
        self._settled = trio.Event()

    async def settled(self) -> None:
        """Return once no action queued here is waiting for its callback."""
        if self.outstanding:
            self._settled = trio.Event()
            await self._settled.wait()
        else:
            await trio.lowlevel.checkpoint()

    def add(self, request: dict[str, Any], on_response: OnResponse) -> None:
        if not isinstance(request, dict) or "action" not in request:
            raise BadRequest('add_to_queue needs a dict request with an "action" key')
        payload = encode_action(request["action"])
        if not self._started:
            self._started = True
            self._engine.nursery.start_soon(self._run)
        # Called from a callback: a follow-up of accepted work, still taken while draining.
        follow_up = trio.lowlevel.current_task() is self._runner
        job = self._engine.accept(payload, self, (request, on_response), None, follow_up=follow_up)
        self._engine.enqueue(job)
        self.outstanding += 1

    # -- the sink side: store and wake, nothing more ---------------------------------------

    def result(self, job: Job, payload: msgspec.Raw, worker: Answerer) -> None:
        self._pending.append((job, payload, worker.pid))
        self._wakeup.wake()

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Answerer) -> None:
        self._pending.extend(zip(jobs, payloads, [worker.pid] * len(jobs), strict=True))
        self._wakeup.wake()

    def error(self, job: Job, err: ActionError, worker: Answerer | None) -> None:
        self._pending.append((job, err, worker.pid if worker is not None else None))
        self._wakeup.wake()

    async def flush(self, timeout: float) -> None:
        """Run callbacks still pending, for at most `timeout` seconds, whatever cancellation
        is going on: the pool is closing and each of them has an outcome to hear."""
        if not self._pending:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            while self._pending:
                await self._call(*self._pending.popleft())

    # -- the runner --------------------------------------------------------------------

    async def _run(self) -> None:
        self._runner = trio.lowlevel.current_task()
        pending = self._pending
        while True:
            if not pending:
                await self._wakeup.wait()
                continue
            await self._call(*pending.popleft())
            await trio.lowlevel.checkpoint()

    async def _call(self, job: Job, outcome: Any, pid: int | None) -> None:
        request, on_response = job.tag
        result = outcome if isinstance(outcome, ActionError) else decode_json(outcome)
        try:
            done = on_response(request, result, pid)
            if inspect.isawaitable(done):
                await done
        except Exception as exc:
            log.error(
                "pool.on_response_failed",
                error=f"{type(exc).__name__}: {exc}",
                action=str(request.get("action"))[:200],
                exc_info=exc,
            )
        finally:
            self.outstanding -= 1
            if not self.outstanding:
                self._settled.set()


class Session:
    """A worker of one's own, for a sequence of actions (see `Pool.session()`)."""

    def __init__(self, engine: Engine, worker: WorkerHandle) -> None:
        self._engine = engine
        self._worker = worker
        # Tasks sharing a session queue for its one worker, in call order: a worker runs
        # one action at a time, and a second one sent meanwhile would corrupt the first.
        self._turn = trio.StrictFIFOLock()

    @property
    def pid(self) -> int:
        """The pid of the session's worker."""
        return self._worker.pid

    async def run(self, action: Any, *, timeout: float | None = None) -> Any:
        """Run one action on the session's worker; as `Pool.run`. Calls from several tasks
        run one at a time, in call order. Once the worker has died, every further call raises
        `WorkerLost` without running anything."""
        engine, worker = self._engine, self._worker
        payload = encode_action(action)
        async with self._turn:
            if worker.exited.is_set() or worker.doom is not None:
                raise WorkerLost(f"the session's worker {worker.pid} is gone", pid=worker.pid)
            waiter = Waiter()
            job = Job(payload, waiter, None, engine.timeout_for(timeout))
            engine.run_reserved(worker, job)
            await waiter.wait(engine, job)
            return waiter.outcome()


@asynccontextmanager
async def open_session(engine: Engine) -> AsyncIterator[Session]:
    worker = await engine.reserve()
    try:
        yield Session(engine, worker)
    finally:
        engine.unreserve(worker)
