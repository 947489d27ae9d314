"""The dispatch core: queue, batches out, answers in, one outcome per action.

Dispatch has no task of its own. It runs inline at the two events that can make work
possible: an action is queued (in the submitter's task) or a worker becomes free (in the
task that read its last answer). A free worker takes its share of the queue — one action
while the queue is shallow, more as it deepens, up to `max_batch_bytes` — in one
non-blocking send. Answers come back one frame per action, in batch order, and are matched
to their jobs by position; one read delivers every answer it holds and wakes each waiting
consumer at most once.

Each worker has a reader task, which steps aside (parks) while the worker is idle. That lets
a caller on an idle pool write its action and read the answer itself: one task hop instead
of two. Trio allows one waiter per descriptor, so whoever reads checks `borrowed` first.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import msgspec
import structlog
import trio

from qoper8d import wire
from qoper8d._classic import Reservation
from qoper8d._handle import EMPTY, Discard, WorkerHandle
from qoper8d._jobqueue import JobQueue, batch_length
from qoper8d._jobs import Job, Sink, Waiter, decode_json, encode_json
from qoper8d._outcomes import Outcomes
from qoper8d.config import PoolConfig
from qoper8d.errors import (
    BadRequest,
    BadResult,
    HandlerError,
    PoolClosed,
    QueueFull,
    ShuttingDown,
)
from qoper8d.monitor import relay
from qoper8d.stats import OUTCOMES

__all__ = ["Engine"]

log = structlog.get_logger("qoper8d.pool")

_sink_of = attrgetter("sink")
_timeout_of = attrgetter("timeout")
#: Decodes the results of a run of answers (`wire.join_done`) for sinks that pass them on.
decode_raws: Callable[[bytes], list[msgspec.Raw]] = msgspec.json.Decoder(list[msgspec.Raw]).decode
#: Seconds the idle fast path polls for its answer before it lets other tasks run.
_QUICK_SPIN = 0.00003
#: A read at least this long means answers are streaming in: read again before waiting.
_BUSY_READ = 1024
#: Answers of slow actions in a batch are collected at most this often (see `_paced`).
_PACE = 0.005
#: Actions this slow or slower (and faster than `_PACE`) are paced.
_PACE_MIN_ACTION = 0.0001
#: Stands for a frame nested too deeply to decode here (see `on_data`).
_TOO_DEEP = wire.Unencodable("it is nested too deeply for the master to decode")


def _next_tick(now: float) -> float:
    """The first multiple of `_PACE` after `now`: the instants are shared by all readers."""
    tick = (now // _PACE + 1) * _PACE
    return tick if tick > now else tick + _PACE  # 0.015 // 0.005 is 2.0 in floats


class Engine(Outcomes):
    """Queue, dispatch and answers; `Outcomes` ends actions when things go wrong. The
    supervisor owns the processes."""

    def __init__(self, config: PoolConfig, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.size = config.size
        self.configure(config)
        self.queue = JobQueue()
        #: Seconds an action takes and bytes its answer takes, smoothed over recent answers
        #: (they cap batch lengths: see `batch_length`).
        self.action_seconds = 0.0
        self.result_bytes = 0.0
        self.idle: list[WorkerHandle] = []
        self.live: set[WorkerHandle] = set()
        self.discard = Discard()
        self.accepting = False
        #: Intake is closed but accepted work (and its follow-ups) runs to its end.
        self.draining = False
        self.stopping = False
        self.submitted = 0
        #: Answers read from workers (results and handler errors alike).
        self.answers = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.quiet = trio.Event()
        #: Sessions waiting for a worker of their own, first come first served.
        self.reservations: deque[Reservation] = deque()
        #: Workers whose answers the pacer collects (`_paced`), and their parked readers;
        #: the pacer task while it is parked.
        self.paced: dict[WorkerHandle, trio.lowlevel.Task] = {}
        self.pacer: trio.lowlevel.Task | None = None

    def configure(self, config: PoolConfig) -> None:
        """Use new settings from now on (the size changes through the supervisor)."""
        self.config = config
        self.max_queue = config.max_queue
        self.idle_spin = config.idle_spin
        self.max_actions = config.max_actions_per_worker
        #: Some job may have a time limit (skips looking for one in every batch otherwise).
        self.timeouts = config.action_timeout > 0 or getattr(self, "timeouts", False)

    # -- accepting -----------------------------------------------------------------------

    def encode(self, action: Any) -> bytes:
        try:
            return encode_json(action)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"the action is not JSON-compatible: {exc}") from None
        except RecursionError:
            raise BadRequest("the action is nested too deeply to encode") from None

    def check_accepting(self, count: int = 1, *, follow_up: bool = False, size: int = 0) -> None:
        """Raise unless `count` more actions (of `size` bytes in all) may be queued now. A
        `follow_up` (queued by the callback of an accepted action) is still taken while the
        pool drains."""
        if not self.accepting and not (follow_up and self.draining and not self.stopping):
            if self.stopping or self.queue.live or self.live:
                raise ShuttingDown("the pool is shutting down and takes no new actions")
            raise PoolClosed("the pool is not running")
        cfg = self.config
        if self.queue.live + count > cfg.max_queue:
            raise QueueFull(
                f"the queue holds {self.queue.live} actions (pool.max_queue = {cfg.max_queue})",
                max_queue=cfg.max_queue,
            )
        if self.queue.bytes + size > cfg.max_queue_bytes:
            raise QueueFull(
                f"the queue holds {self.queue.bytes} bytes of actions and this one has {size} "
                f"(pool.max_queue_bytes = {cfg.max_queue_bytes})",
                max_queue_bytes=cfg.max_queue_bytes,
            )

    def timeout_for(self, timeout: float | None) -> float:
        if timeout is None:
            return self.config.action_timeout
        if not timeout >= 0 or math.isinf(timeout):
            raise BadRequest(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
        if timeout:
            self.timeouts = True
        return float(timeout)

    def submit(
        self,
        payload: bytes,
        sink: Sink,
        tag: Any,
        timeout: float | None,
        *,
        follow_up: bool = False,
    ) -> Job:
        job = self.accept(payload, sink, tag, timeout, follow_up=follow_up)
        self.enqueue(job)
        self.dispatch()
        return job

    def enqueue(self, job: Job) -> None:
        """Put `job` at the tail of the queue."""
        self.queue.push(job)

    def accept(
        self,
        payload: bytes,
        sink: Sink,
        tag: Any,
        timeout: float | None,
        *,
        follow_up: bool = False,
    ) -> Job:
        """A job for an action, counted as submitted; the caller queues or runs it."""
        queue, cfg = self.queue, self.config
        if (
            not self.accepting
            or queue.live >= cfg.max_queue
            or queue.bytes + len(payload) > cfg.max_queue_bytes
        ):
            self.check_accepting(follow_up=follow_up, size=len(payload))
        job = Job(payload, sink, tag, self.timeout_for(timeout))
        self.submitted += 1
        return job

    def submit_many(self, jobs: list[Job], payloads: list[bytes]) -> None:
        """Queue jobs built by a bulk submitter (`map`, a client's pipelined submits) for
        `payloads`, with one dispatch for all of them.

        As if they had come one at a time: while the queue is empty, each idle worker takes
        one of them first, and only the rest are queued and batched. A first action that
        turns out slow then holds up no others behind it in its worker's batch (the pool
        knows nothing yet of how long actions take).
        """
        self.submitted += len(jobs)
        idle = self.idle
        queue = self.queue
        first = 0
        if idle and not queue.live and not queue.held(jobs[0].sink):
            while idle and first < len(jobs):
                self.send(idle.pop(), [jobs[first]], [payloads[first]])
                first += 1
            if first:
                jobs, payloads = jobs[first:], payloads[first:]
        if jobs:
            queue.extend(jobs, payloads)
            self.dispatch()

    async def run(self, action: Any, timeout: float | None) -> Any:
        try:
            payload = encode_json(action)
        except (TypeError, ValueError, OverflowError, RecursionError):
            payload = self.encode(action)  # raises BadRequest, with the reason
        queue = self.queue
        if (
            not self.accepting
            or queue.live >= self.max_queue
            or queue.bytes + len(payload) > self.config.max_queue_bytes
        ):
            self.check_accepting(size=len(payload))
        waiter = Waiter()
        job = Job(
            payload,
            waiter,
            None,
            self.config.action_timeout if timeout is None else self.timeout_for(timeout),
        )
        self.submitted += 1
        worker = self.borrowable()
        if worker is not None:
            await self.run_borrowed(worker, job, lambda: waiter.done)
            if not waiter.done:
                # The worker died under us: the supervisor delivers the outcome, or a retry.
                await waiter.wait(lambda: self.cancel(job))
            return waiter.outcome()
        self.enqueue(job)
        self.dispatch()
        await waiter.wait(lambda: self.cancel(job))
        return waiter.outcome()

    def hold(self, sink: Sink) -> None:
        """Dispatch none of `sink`'s queued actions until `release(sink)`; others go past."""
        self.queue.hold(sink)

    def release(self, sink: Sink) -> None:
        self.queue.release(sink)
        self.dispatch()

    def borrowable(self) -> WorkerHandle | None:
        """An idle worker the caller may run one action on itself (see `run_borrowed`), taken
        out of the idle list; None unless the pool is idle and nothing is queued."""
        idle = self.idle
        if idle and not self.queue.live and idle[-1].reader_task is not None:
            return idle.pop()
        return None

    async def run_borrowed(
        self,
        worker: WorkerHandle,
        job: Job,
        finished: Callable[[], bool],
        *,
        hand_over: bool = False,
    ) -> None:
        """The idle fast path: send `job` to `worker` and read the answer in this task.

        The worker's reader stays parked meanwhile (trio allows one reader per descriptor);
        if more work lands on this worker, the reader takes over when we leave. Returns once
        `finished()` (the job's outcome was delivered) or the worker is gone — or, with
        `hand_over`, once `pool.idle_spin` has passed: the worker's reader then takes over,
        so a task with other duties (a connection's reader) is never held for long.
        """
        worker.borrowed = True
        self.send(worker, [job], [job.payload])
        rfd = worker.rfd
        # Poll for the answer for up to `pool.idle_spin` seconds, yielding to other tasks
        # between polls, before sleeping in epoll: a trivial action comes back in tens of
        # microseconds, and waking a sleeping master costs about as much again.
        spin_until = time.perf_counter() + self.idle_spin
        poll = worker.poll
        # A trivial action is answered within about 10 us: poll up to 30 us without leaving
        # this task (a trip around trio's loop costs 7 us here; the pool is idle, so little
        # else can be waiting), each poll giving way to a process waiting for this CPU.
        quick = min(spin_until, time.perf_counter() + _QUICK_SPIN)
        while not poll(0) and time.perf_counter() < quick:
            os.sched_yield()
        try:
            while not finished() and not worker.eof:
                if spin_until:
                    if not poll(0):
                        if time.perf_counter() > spin_until:
                            if hand_over:
                                return
                            spin_until = 0.0
                        await trio.lowlevel.checkpoint()
                        continue
                elif hand_over:
                    return
                else:
                    await trio.lowlevel.wait_readable(rfd)
                try:
                    n = os.readv(rfd, [worker.frames.buffer()])
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                if n:
                    self.on_data(worker, n)
                else:
                    worker.eof = True
        except trio.ClosedResourceError:
            pass  # the worker exited; the supervisor has delivered what it could
        except BaseException:
            if not finished():
                self.cancel(job)
            raise
        finally:
            worker.borrowed = False
            if worker.busy:
                self.unpark(worker)

    # -- dispatch (the hot path) ---------------------------------------------------------

    def dispatch(self) -> None:
        idle = self.idle
        queue = self.queue
        while idle and queue.live:
            batch = self.take_batch(self.allowance(idle[-1]))
            if not batch[0]:
                return  # all that waits is held
            self.send(idle.pop(), *batch)

    def allowance(self, worker: WorkerHandle) -> int:
        """How many more actions `worker` may run (`pool.max_actions_per_worker`)."""
        return self.max_actions - worker.answered if self.max_actions else self.max_queue

    def take_batch(self, most: int) -> tuple[list[Job], list[bytes], bool]:
        """Take the next batch, of at most `most` jobs, off the queue (empty if all that
        waits is held)."""
        queue = self.queue
        want = batch_length(queue.live, self.size, most, self.action_seconds, self.result_bytes)
        return queue.take(want, self.config.max_batch_bytes)

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs back at the head of the queue, in order (they never started)."""
        self.queue.requeue(jobs)

    def send(
        self, worker: WorkerHandle, batch: list[Job], payloads: list[bytes], replayed: bool = False
    ) -> None:
        worker.inflight = batch
        worker.pos = 0
        worker.replayed = replayed
        worker.seq += 1
        worker.head_started = trio.current_time()
        worker.timed = self.timeouts and any(map(_timeout_of, batch))
        if worker.timed:
            self.arm(worker)
        frame = wire.encode_batch(worker.seq, payloads)
        try:
            sent = os.write(worker.wfd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The worker is gone and got none of it: its exit puts the batch back untouched.
            worker.unsent = True
            worker.eof = True
            return
        if sent < len(frame):
            worker.outbuf = frame[sent:]
            self.nursery.start_soon(self._flush, worker)
        if not worker.borrowed:
            self.unpark(worker)

    async def _flush(self, worker: WorkerHandle) -> None:
        # Rare: a frame larger than the pipe's free space (a very large action).
        wfd = worker.wfd
        try:
            while worker.outbuf:
                await trio.lowlevel.wait_writable(wfd)
                try:
                    sent = os.write(wfd, worker.outbuf)
                except BlockingIOError:
                    continue
                worker.outbuf = worker.outbuf[sent:]
        except (trio.ClosedResourceError, OSError):
            worker.outbuf = b""

    def unpark(self, worker: WorkerHandle) -> None:
        task = worker.reader_task
        if task is not None:
            worker.reader_task = None
            trio.lowlevel.reschedule(task)

    async def _park(self, worker: WorkerHandle, task_status: Any) -> None:
        worker.reader_task = trio.lowlevel.current_task()
        task_status.started()

        def abort(_: Any) -> trio.lowlevel.Abort:
            worker.reader_task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def read(self, worker: WorkerHandle, *, task_status: Any) -> None:
        """The worker's reader task: runs until cancelled by the worker's exit. Started
        once it is parked, so that the idle fast path can borrow the worker at once."""
        rfd = worker.rfd
        frames = worker.frames
        readv = os.readv
        # While answers stream in faster than we handle them, read again right after a
        # checkpoint: more will be there, and that skips an epoll round. When they trickle
        # in (slow actions), a read would only fail: go straight to waiting.
        busy_stream = False
        while True:
            if worker.borrowed or worker.eof or not worker.busy:
                busy_stream = False
                await self._park(worker, task_status)
                task_status = trio.TASK_STATUS_IGNORED
                continue
            if not busy_stream:
                await trio.lowlevel.wait_readable(rfd)
            try:
                n = readv(rfd, [frames.buffer()])
            except BlockingIOError:
                busy_stream = False
                continue
            except OSError:
                n = 0
            if not n:
                worker.eof = True
                continue
            self.on_data(worker, n)
            busy_stream = n >= _BUSY_READ
            if busy_stream:
                await trio.lowlevel.checkpoint()
            elif self._paced(worker):
                # The pacer reads this worker from now on, until its batch nears its end.
                await self._hand_to_pacer(worker)

    def _paced(self, worker: WorkerHandle) -> bool:
        """Whether `worker`'s answers may wait for the pacer's next tick.

        A worker going through a batch of slow actions answers one at a time, and reading
        each answer on its own costs the master a wake-up: 50-100 us of CPU on a small VM,
        taken from the workers when they keep every core busy. The answers keep in the
        pipe, where the worker's death cannot lose them, so they are collected every
        `_PACE` seconds instead, one wake-up for every paced worker. Only for actions
        shorter than `_PACE` but not fast (fast ones pile up between reads anyway; longer
        ones wake us no more often than the pacer would), only while the worker has at least
        `_PACE` of work queued behind the running action (it never waits for us: the last
        answers of a batch are read as they come), and never for a batch with a time limit
        (a deadline runs from the read of the answer before it).
        """
        seconds = self.action_seconds
        return (
            _PACE_MIN_ACTION <= seconds < _PACE
            and not worker.timed
            and (len(worker.inflight) - worker.pos - 1) * seconds >= _PACE
        )

    async def _hand_to_pacer(self, worker: WorkerHandle) -> None:
        """Park this reader while the pacer collects `worker`'s answers on its ticks."""
        self.paced[worker] = trio.lowlevel.current_task()
        pacer, self.pacer = self.pacer, None
        if pacer is not None:
            trio.lowlevel.reschedule(pacer)

        def abort(_: Any) -> trio.lowlevel.Abort:
            del self.paced[worker]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def pace(self) -> None:
        """The pacer task (the pool starts it with the engine): at every multiple of
        `_PACE` seconds, reads the answers of every paced worker, and gives a worker back
        to its reader once it is no longer paced."""

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.pacer = None
            return trio.lowlevel.Abort.SUCCEEDED

        paced = self.paced
        while True:
            if not paced:
                self.pacer = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            await trio.sleep_until(_next_tick(trio.current_time()))
            for worker in list(paced):
                if worker not in paced:
                    continue  # its reader was cancelled meanwhile: the worker is gone
                self.collect(worker)
                if worker.eof or not worker.busy or not self._paced(worker):
                    trio.lowlevel.reschedule(paced.pop(worker))

    def collect(self, worker: WorkerHandle) -> None:
        """Read whatever `worker` has written, without waiting (all of it, after its exit)."""
        while worker.busy and not worker.unsent:
            room = worker.frames.buffer()
            try:
                n = os.readv(worker.rfd, [room])
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if not n:
                worker.eof = True
                return
            self.on_data(worker, n)
            if n < len(room):
                return  # that was all the pipe held: spare a read that would fail

    def on_data(self, worker: WorkerHandle, n: int) -> None:
        frames = worker.frames
        inflight = worker.inflight
        pos = start = worker.pos
        try:
            chunk = frames.take(n)
            if not chunk:
                return
            joined = wire.join_done(chunk)
            try:
                if joined is not None:
                    # Only answers, as in bulk: deliver them all in one call per sink,
                    # without a Python step per result.
                    pos += self._deliver_run(worker, joined, chunk.count(b"\n"))
                    messages: list[Any] = []
                else:
                    messages = frames.decode(chunk)
            except RecursionError:
                # A result nested deeper than this process can decode (the worker's stack
                # was shallower): it ends bad_result, frame by frame; nothing was delivered.
                messages = frames.decode_each(chunk, _TOO_DEEP)
            for m in messages:
                if type(m) is wire.Done:
                    job = inflight[pos]
                    pos += 1
                    job.sink.result(job, m.result, worker)
                else:
                    pos = self._on_other(worker, m, inflight, pos)
                    inflight = worker.inflight  # a Retire or a Cut ends the batch here
        except IndexError:
            worker.pos = pos
            self.protocol_violation(worker, "an answer with no action in flight")
            return
        except wire.ProtocolError as exc:
            worker.pos = pos
            self.protocol_violation(worker, str(exc))
            return
        if pos == start:
            if pos == len(inflight):
                self._worker_free(worker)  # a Retire or a Cut alone ended the batch
            return
        worker.pos = pos
        done = pos - start
        worker.slot.actions_done += done
        worker.answered += done
        self.answers += done
        now = trio.current_time()
        # How long an action takes, smoothed: the time since this worker's previous answers
        # (or the send) shared among the answers of this read.
        self.action_seconds += ((now - worker.head_started) / done - self.action_seconds) * 0.1
        # Answers' size, smoothed, but quick to rise: a client slow to read large results
        # must not find a batch's worth of them piled up in the master (`batch_length`).
        size = len(chunk) / done
        self.result_bytes = max(size, self.result_bytes + (size - self.result_bytes) * 0.1)
        worker.head_started = now
        if self.max_actions and worker.answered >= self.max_actions and worker.retire is None:
            worker.dead = True  # spent: no more work; it leaves when its turn to recycle comes
            self.request_retire(
                worker,
                f"answered {worker.answered} actions "
                f"(pool.max_actions_per_worker = {self.max_actions})",
            )
        if pos == len(inflight):
            self._worker_free(worker)
        elif worker.timed:
            self.arm(worker)

    def _deliver_run(self, worker: WorkerHandle, joined: bytes, count: int) -> int:
        """Deliver `count` results, `joined` by `wire.join_done`, to the next jobs in flight."""
        pos = worker.pos
        jobs = worker.inflight[pos : pos + count]
        if len(jobs) < count:
            raise IndexError
        sinks = set(map(_sink_of, jobs)) if count > 1 else {jobs[0].sink}
        sink = sinks.pop() if len(sinks) == 1 else None
        decoded = getattr(sink, "decoded", None)
        try:
            results = decode_json(joined) if decoded else decode_raws(joined)
        except msgspec.DecodeError as exc:
            raise wire.ProtocolError(f"undecodable frame: {exc}") from None
        if len(results) != count + 1:
            raise wire.ProtocolError(f"{count} frames held {len(results) - 1} results")
        del results[0]  # the Done tag
        if decoded:
            decoded(jobs, results, worker)
        elif sink is not None:
            sink.results(jobs, results, worker)
        else:
            for job, raw in zip(jobs, results, strict=True):
                job.sink.result(job, raw, worker)
        return count

    def _on_other(self, worker: WorkerHandle, m: Any, inflight: list[Job], pos: int) -> int:
        kind = type(m)
        if kind is wire.Raised:
            self.end(
                inflight[pos], HandlerError(m.message, type=m.type, traceback=m.traceback), worker
            )
            return pos + 1
        if kind is wire.Unencodable:
            self.end(
                inflight[pos],
                BadResult(f"the handler's result cannot be sent: {m.message}"),
                worker,
            )
            return pos + 1
        if kind is wire.Refused:
            # The worker could not decode this action: our bug, not the handler's nor the
            # worker's (the pool encodes every action it sends). It ends that action alone.
            job = inflight[pos]
            log.error(
                "worker.undecodable_action",
                slot=worker.slot.index,
                pid=worker.pid,
                error=m.message,
                action=job.payload[:200].decode("utf-8", "replace"),
            )
            self.end(job, HandlerError(m.message, type="qoper8d.ProtocolError"), worker)
            return pos + 1
        if kind is wire.Cut:
            # The worker stopped the batch here (its results passed the batch's budget): the
            # rest never started and goes back to the head of the queue.
            rest = [job for job in inflight[pos:] if job.sink is not self.discard]
            worker.inflight = inflight[:pos]
            if rest:
                self.requeue(rest)
        elif kind is wire.Log:
            relay(log, m.level, m.event, m.fields, slot=worker.slot.index, pid=worker.pid)
        elif kind is wire.Retire:
            # The worker stops here: the rest of its batch never started and goes back to
            # the head of the queue; it takes no more work and is replaced.
            rest = [job for job in inflight[pos:] if job.sink is not self.discard]
            worker.inflight = inflight[:pos]
            worker.dead = True
            if rest:
                self.requeue(rest)
                self.dispatch()
            self.request_retire(worker, m.reason)
        else:
            self.protocol_violation(worker, f"unexpected {kind.__name__} message")
        return pos

    def _worker_free(self, worker: WorkerHandle) -> None:
        worker.inflight = EMPTY
        worker.pos = 0
        if worker.timed:
            worker.timed = False
            self.arm(worker)
        if worker.dead or worker.reserved:
            if worker.changed is not None:
                worker.changed.set()
            if not self.accepting:
                self.check_quiet()
            return
        if self.reservations:
            self.reservations.popleft().grant(worker)
            return
        if self.queue.live:
            batch = self.take_batch(self.allowance(worker))
            if batch[0]:
                self.send(worker, *batch)
                return
        self.idle.append(worker)
        if not self.accepting:
            self.check_quiet()

    def add_worker(self, worker: WorkerHandle) -> None:
        """A worker passed its handshake: it takes work from now on."""
        self.live.add(worker)
        self.make_available(worker)

    def make_available(self, worker: WorkerHandle) -> None:
        """An idle worker (new, or back from a session) takes work from now on."""
        if self.reservations:
            self.reservations.popleft().grant(worker)
        else:
            self.idle.append(worker)
            self.dispatch()

    # -- time limits and recycling -------------------------------------------------------

    def deadline(self, worker: WorkerHandle) -> float:
        """When the action now running on `worker` passes its time limit (inf: never)."""
        if worker.pos < len(worker.inflight):
            limit = worker.inflight[worker.pos].timeout
            if limit > 0:
                return worker.head_started + limit
        return math.inf

    def arm(self, worker: WorkerHandle) -> None:
        timer = worker.timer
        if timer is not None:
            timer.deadline = self.deadline(worker)

    async def watch_deadline(self, worker: WorkerHandle, *, task_status: Any) -> None:
        """The worker's timer task: kills it when its running action passes its limit."""
        while True:
            with trio.CancelScope(deadline=self.deadline(worker)) as timer:
                worker.timer = timer
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep_forever()
            worker.timer = None
            if not worker.dead and trio.current_time() >= self.deadline(worker):
                self.time_out(worker)
                return

    def request_retire(self, worker: WorkerHandle, reason: str) -> None:
        """Ask for `worker` to be replaced between actions (the supervisor does it)."""
        if worker.retire is None:
            worker.retire = reason
            worker.attention.set()
