"""How actions end when they do not end with a result: cancellation, a worker's death, a
time limit, a stop. Kept apart from the hot path, which never comes here.

The rules (SPEC section 3): each accepted action ends exactly once. When a worker dies with a
batch in flight, the first unanswered action is the one that may have run (`worker_lost`,
retried while it has attempts left, `poisoned` once it has killed `poison_threshold`
workers); the rest never started and go back to the head of the queue, attempts untouched.
An action whose outcome was given early (cancelled, timed out) has its sink replaced by
`discard`, so an answer that still arrives is dropped, not delivered twice.

`Outcomes` works over the queue and the live workers' handles, which the engine owns and
passes in; it stops a worker only through the `stop` the engine gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import structlog
import trio

from qoper8d import wire
from qoper8d._handle import Discard, Doom, WorkerHandle
from qoper8d._jobqueue import JobQueue
from qoper8d._jobs import Job, Sink
from qoper8d._output import Bucket
from qoper8d._process import ExitStatus
from qoper8d.config import PoolConfig
from qoper8d.errors import (
    ActionCancelled,
    ActionError,
    ActionTimeout,
    HandlerError,
    Poisoned,
    ShuttingDown,
    WorkerLost,
)
from qoper8d.stats import OUTCOMES

__all__ = ["Outcomes"]

log = structlog.get_logger("qoper8d.pool")

#: Bytes of a failed action shown in its `action.failed` event.
_ACTION_SHOWN = 300


class Outcomes:
    """The outcome counters, and every way of ending an action without a result."""

    def __init__(
        self,
        config: PoolConfig,
        queue: JobQueue,
        live: set[WorkerHandle],
        stop: Callable[[WorkerHandle, Doom], None],
    ) -> None:
        self.config = config
        self.queue = queue
        self.live = live
        self.stop = stop
        #: The sink of every job whose outcome was given before its answer came.
        self.discard = Discard()
        #: Outcomes so far by code; results are counted apart (`results`).
        self.counts = dict.fromkeys(OUTCOMES, 0)
        #: `action.failed` events, at most `pool.output_rate` a second.
        self.failures = Bucket(config.output_rate)

    def end(self, job: Job, err: ActionError, worker: WorkerHandle | None) -> None:
        if job.sink is not self.discard:
            self.counts[err.code] += 1
        job.sink.error(job, err, worker)

    def results(self, answers: int) -> int:
        """Actions that ended with a result, of `answers` read from workers."""
        counts = self.counts
        return answers - counts["handler_error"] - counts["bad_result"] - self.discard.answers

    def waiting(self, worker: WorkerHandle) -> list[Job]:
        """The jobs `worker` holds that still wait for their outcome."""
        discard = self.discard
        return [job for job in worker.inflight[worker.pos :] if job.sink is not discard]

    def find_running(self, job: Job) -> WorkerHandle | None:
        for worker in self.live:
            if job in worker.inflight[worker.pos :]:
                return worker
        return None

    def cancel(self, job: Job) -> None:
        """The submitter withdrew `job`: drop it if queued, stop its worker if running."""
        if job.sink is self.discard or job.cancelled:
            return
        worker = self.find_running(job)
        if worker is None:
            self.queue.cancel(job)
            self.end(job, ActionCancelled("cancelled while queued"), None)
        elif worker.inflight[worker.pos] is job:
            self.end(
                job,
                ActionCancelled("cancelled while running; its worker is replaced", pid=worker.pid),
                worker,
            )
            self.stop(worker, "cancelled")
        else:
            # Already in a worker's batch but not started: it will run when its turn comes
            # (a worker reads nothing mid-batch), and its answer is dropped.
            self.end(job, ActionCancelled("cancelled before it started"), None)
        job.sink = self.discard

    def withdraw(self, sink: Sink) -> int:
        """Cancel, silently, every unanswered job of `sink` (its submitter is gone)."""
        gone = self.queue.withdraw(sink)
        for worker in self.live:
            gone += [job for job in worker.inflight[worker.pos :] if job.sink is sink]
        for job in gone:
            job.sink = self.discard
        self.counts["cancelled"] += len(gone)
        return len(gone)

    def on_exit(
        self, worker: WorkerHandle, status: ExitStatus, stopping: bool
    ) -> tuple[str, list[Job]]:
        """Give the actions a dead worker held their outcome: what it was doing, and the
        jobs to put back at the head of the queue (in order)."""
        pending = worker.unanswered()
        if not pending:
            return "", []
        first: Job | None = pending[0]
        rest = pending[1:]
        if worker.unsent:
            first, rest = None, pending
        requeue = [job for job in rest if job.sink is not self.discard]
        doing = ""
        if first is not None:
            doing = first.payload[:200].decode("utf-8", "replace")
            if self._first_unanswered(first, worker, status, stopping):
                requeue.insert(0, first)
        return doing, requeue

    def _first_unanswered(
        self, job: Job, worker: WorkerHandle, status: ExitStatus, stopping: bool
    ) -> bool:
        """The outcome of the action a dying worker may have been running; True to retry."""
        if job.sink is self.discard:
            return False  # cancelled or timed out: answered already
        job.runs += 1
        if worker.doom == "stopping" or stopping:
            self.end(
                job,
                ShuttingDown("the pool stopped while the action was running", pid=worker.pid),
                worker,
            )
            return False
        job.deaths += 1
        cfg = self.config
        details = {"pid": worker.pid, **status.details(), "attempts": job.runs}
        if job.deaths >= cfg.poison_threshold:
            self.end(
                job,
                Poisoned(
                    f"the action killed {job.deaths} workers "
                    f"(pool.poison_threshold = {cfg.poison_threshold})",
                    **details,
                ),
                worker,
            )
            return False
        if job.runs >= (job.max_attempts or cfg.max_attempts):
            self.end(
                job,
                WorkerLost(f"worker {worker.pid} died running the action ({status})", **details),
                worker,
            )
            return False
        return True

    def raised(self, job: Job, worker: WorkerHandle, m: wire.Raised) -> None:
        """The handler raised running `job`: its outcome, and an `action.failed` event for
        the operator (rate-limited like worker output; the traceback at debug level)."""
        self.end(job, HandlerError(m.message, type=m.type, traceback=m.traceback), worker)
        failures = self.failures
        if not failures.take():
            return
        if failures.dropped:
            log.warning("action.failed_dropped", events=failures.dropped)
            failures.dropped = 0
        about = {"slot": worker.slot, "pid": worker.pid}
        action = job.payload[:_ACTION_SHOWN].decode("utf-8", "replace")
        if len(job.payload) > _ACTION_SHOWN:
            action += f" [... {len(job.payload) - _ACTION_SHOWN} more bytes]"
        log.warning("action.failed", type=m.type, message=m.message[:1000], action=action, **about)
        log.debug("action.failed.traceback", traceback=m.traceback, **about)

    def refused(self, job: Job, worker: WorkerHandle, why: str) -> None:
        """`worker` could not decode `job`'s action: our bug, not the handler's nor the
        worker's (the pool encodes every action it sends). It ends that action alone."""
        log.error(
            "worker.undecodable_action",
            slot=worker.slot,
            pid=worker.pid,
            error=why,
            action=job.payload[:200].decode("utf-8", "replace"),
        )
        self.end(job, HandlerError(why, type="qoper8d.ProtocolError"), worker)

    def time_out(self, worker: WorkerHandle) -> None:
        """The action running on `worker` passed its deadline."""
        job = worker.inflight[worker.pos]
        self.end(
            job,
            ActionTimeout(
                f"the action ran longer than {job.timeout:g} s; its worker is replaced",
                timeout=job.timeout,
                pid=worker.pid,
            ),
            worker,
        )
        job.sink = self.discard
        self.stop(worker, "timeout")

    async def watch_deadline(self, worker: WorkerHandle, *, task_status: Any) -> None:
        """The worker's timer task: stops it when its running action passes its limit."""
        while True:
            with trio.CancelScope(deadline=worker.deadline()) as timer:
                worker.timer = timer
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep_forever()
            worker.timer = None
            if not worker.dead and trio.current_time() >= worker.deadline():
                self.time_out(worker)
                return

    def protocol_violation(self, worker: WorkerHandle, why: str) -> None:
        # Its protocol state is in doubt: never reuse it.
        log.error("worker.protocol_error", slot=worker.slot, pid=worker.pid, error=why)
        worker.eof = True
        self.stop(worker, "protocol error")

    def end_all(self, jobs: Iterable[Job], message: str) -> None:
        """End `jobs` (taken out of the queue) `shutting_down`."""
        for job in jobs:
            self.end(job, ShuttingDown(message), None)

    def end_running(self, message: str) -> None:
        """End what every live worker holds `shutting_down`, now, while whoever waits for it
        can still hear it (the workers are stopped next; their exits deliver nothing)."""
        for worker in self.live:
            for job in self.waiting(worker):
                self.end(job, ShuttingDown(message, pid=worker.pid), worker)
                job.sink = self.discard
