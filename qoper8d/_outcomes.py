"""How actions end when they do not end with a result: cancellation, a worker's death, a
time limit, a stop. A mixin of the engine, kept apart from the hot path it never touches.

The rules (SPEC section 3): each accepted action ends exactly once. When a worker dies with a
batch in flight, the first unanswered action is the one that may have run (`worker_lost`,
retried while it has attempts left, `poisoned` once it has killed `poison_threshold`
workers); the rest never started and go back to the head of the queue, attempts untouched.
An action whose outcome was given early (cancelled, timed out) has its sink replaced by the
engine's `Discard`, so an answer that still arrives is dropped, not delivered twice.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import structlog
import trio

from qoper8d._handle import EMPTY, Discard, WorkerHandle
from qoper8d._jobqueue import JobQueue
from qoper8d._jobs import Job, Sink
from qoper8d._process import ExitStatus
from qoper8d.errors import (
    ActionCancelled,
    ActionError,
    ActionTimeout,
    Poisoned,
    ShuttingDown,
    WorkerLost,
)

if TYPE_CHECKING:
    from qoper8d.config import PoolConfig

__all__ = ["Outcomes"]

log = structlog.get_logger("qoper8d.pool")


class Outcomes:
    """Ending actions without a result. Mixed into `Engine`, whose state it shares."""

    if TYPE_CHECKING:
        config: PoolConfig
        nursery: trio.Nursery
        queue: JobQueue
        live: set[WorkerHandle]
        idle: list[WorkerHandle]
        discard: Discard
        accepting: bool
        stopping: bool
        answers: int
        outcomes: dict[str, int]
        quiet: trio.Event

        def requeue(self, jobs: list[Job]) -> None: ...

    def end(self, job: Job, err: ActionError, worker: WorkerHandle | None) -> None:
        if job.sink is not self.discard:
            self.outcomes[err.code] += 1
        job.sink.error(job, err, worker)

    def result_count(self) -> int:
        """Actions that ended with a result."""
        errors = self.outcomes["handler_error"] + self.outcomes["bad_result"]
        return self.answers - errors - self.discard.answers

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
            self.kill(worker, "cancelled")
        else:
            # Already in a worker's batch but not started: it will run when its turn comes
            # (a worker reads nothing mid-batch), and its answer is dropped.
            self.end(job, ActionCancelled("cancelled before it started"), None)
        job.sink = self.discard
        if not self.accepting:
            self.check_quiet()

    def withdraw(self, sink: Sink) -> int:
        """Cancel, silently, every unanswered job of `sink` (a map being closed)."""
        queued = self.queue.withdraw(sink)
        for job in queued:
            job.sink = self.discard
        count = len(queued)
        self.outcomes["cancelled"] += count
        for worker in self.live:
            for job in worker.inflight[worker.pos :]:
                if job.sink is sink:
                    job.sink = self.discard
                    self.outcomes["cancelled"] += 1
                    count += 1
        if not self.accepting:
            self.check_quiet()
        return count

    def on_exit(self, worker: WorkerHandle, status: ExitStatus) -> str:
        """Give every action still in flight its outcome; returns what it was doing."""
        pending = worker.inflight[worker.pos :]
        worker.inflight = EMPTY
        worker.pos = 0
        if not pending:
            return ""
        first: Job | None = pending[0]
        rest = pending[1:]
        if worker.unsent:
            first, rest = None, pending
        requeue = [job for job in rest if job.sink is not self.discard]
        doing = ""
        if first is not None:
            doing = first.payload[:200].decode("utf-8", "replace")
            if self._first_unanswered(first, worker, status):
                requeue.insert(0, first)
        if requeue:
            self.requeue(requeue)
        return doing

    def _first_unanswered(self, job: Job, worker: WorkerHandle, status: ExitStatus) -> bool:
        """The outcome of the action a dying worker may have been running; True to retry."""
        if job.sink is self.discard:
            return False  # cancelled or timed out: answered already
        job.runs += 1
        if worker.doom == "stopping" or self.stopping:
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
        self.kill(worker, "timeout")

    def protocol_violation(self, worker: WorkerHandle, why: str) -> None:
        # Its protocol state is in doubt: never reuse it.
        log.error("worker.protocol_error", slot=worker.slot.index, pid=worker.pid, error=why)
        worker.eof = True
        self.kill(worker, None)

    def kill(self, worker: WorkerHandle, doom: str | None) -> None:
        """Stop a worker now: SIGTERM, `pool.kill_timeout` to go, then SIGKILL."""
        if worker.doom is None:
            worker.doom = doom
        self.take_out(worker)
        self.nursery.start_soon(self.escalate, worker)

    def take_out(self, worker: WorkerHandle) -> None:
        """No more work for this worker."""
        worker.dead = True
        if worker in self.idle:
            self.idle.remove(worker)

    async def escalate(self, worker: WorkerHandle, first: int = signal.SIGTERM) -> None:
        """Signal `first` (0: none, it was asked to stop already), then every
        `pool.kill_timeout` escalate: SIGTERM, then SIGKILL."""
        steps: list[int] = [signal.SIGTERM, signal.SIGKILL]
        if first:
            worker.proc.signal(first)
            steps = steps[steps.index(first) + 1 :] if first in steps else steps
        for signum in steps:
            with trio.move_on_after(self.config.kill_timeout):
                await worker.exited.wait()
                return
            worker.proc.signal(signum)

    # -- stopping ------------------------------------------------------------------------

    def check_quiet(self) -> None:
        """Set `quiet` once every accepted action has its outcome: nothing queued, and
        nothing in flight but answers nobody waits for (cancelled, timed out, withdrawn)."""
        if self.queue.live:
            return
        discard = self.discard
        for worker in self.live:
            for job in worker.inflight[worker.pos :]:
                if job.sink is not discard:
                    return
        self.quiet.set()

    def end_queued(self, message: str) -> None:
        for job in self.queue.clear():
            self.end(job, ShuttingDown(message), None)
