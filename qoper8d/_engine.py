"""The dispatch core: the pool's lifecycle, its queue, batches out, answers in.

Dispatch has no task of its own. It runs inline at the two events that can make work
possible: an action is queued (in the submitter's task) or a worker becomes free (in the
task that read its last answer). A free worker takes its share of the queue — one action
while the queue is shallow, more as it deepens, up to `max_batch_bytes` — in one
non-blocking send. Answers come back one frame per action, in batch order, and are matched
to their jobs by position; one read delivers every answer it holds and wakes each waiting
consumer at most once.

Each worker has a reader task, which steps aside (parks) while the worker is idle. That lets
a caller on an idle pool write its action and read the answer itself (`_calls`): one task
hop instead of two. Trio allows one waiter per descriptor, so whoever reads checks
`borrowed` first.

The engine owns the pool's lifecycle (`state`), and with it when work is taken: it opens
intake once every worker is ready, closes it to drain or stop, and ends what is left when
the pool stops or fails. Endings other than a result are `Outcomes`'; processes are the
supervisor's, which the engine asks to stop a worker only through `stop_worker`.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable
from functools import partial
from operator import attrgetter
from typing import Any, Literal

import msgspec
import structlog
import trio

from qoper8d import wire
from qoper8d._channel import collect, flush, read
from qoper8d._handle import EMPTY, Doom, WorkerHandle
from qoper8d._jobqueue import JobQueue, batch_length
from qoper8d._jobs import Job, Sink, decode_json
from qoper8d._outcomes import Outcomes
from qoper8d._pacer import Pacer, should_pace
from qoper8d._process import ExitStatus, stop_worker
from qoper8d._wakeup import Wakeup
from qoper8d.config import PoolConfig
from qoper8d.errors import BadRequest, BadResult, PoolClosed, QueueFull, ShuttingDown
from qoper8d.monitor import relay
from qoper8d.stats import DurationCounts

__all__ = ["Engine", "State"]

log = structlog.get_logger("qoper8d.pool")

#: Where the pool is in its life: work is accepted only while "running"; "draining" takes
#: only follow-ups of accepted work, if that; the last three take nothing.
State = Literal["starting", "running", "draining", "stopping", "stopped", "failed"]

_sink_of = attrgetter("sink")
_timeout_of = attrgetter("timeout")
#: Decodes the results of a run of answers (`wire.join_done`) for sinks that pass them on.
decode_raws: Callable[[bytes], list[msgspec.Raw]] = msgspec.json.Decoder(list[msgspec.Raw]).decode
#: Stands for a frame nested too deeply to decode here (see `on_data`).
_TOO_DEEP = wire.Unencodable("it is nested too deeply for the master to decode")


class Engine:
    """Lifecycle, queue, dispatch and answers. The supervisor owns the processes."""

    def __init__(self, config: PoolConfig, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.size = config.size
        self.queue = JobQueue()
        self.idle: list[WorkerHandle] = []
        self.live: set[WorkerHandle] = set()
        self.outcomes = Outcomes(config, self.queue, self.live, self.stop_worker)
        #: (The hot path's shortcut to `outcomes.discard`.)
        self.discard = self.outcomes.discard
        self.configure(config)
        self.state: State = "starting"
        #: While draining: follow-ups of accepted work (callbacks' actions) are still taken.
        self.follow_ups = False
        #: Smoothed over recent answers: seconds an action takes and bytes its answer takes
        #: (they cap batch lengths: see `batch_length`), and the share of answers that came
        #: within `pool.idle_spin` (a caller polls for its answer only while most do).
        self.action_seconds = 0.0
        self.result_bytes, self.quick_share = 0.0, 1.0
        self.submitted = 0
        #: Answers read from workers (results and handler errors alike).
        self.answers = 0
        #: How long actions ran, as the workers counted them.
        self.durations = DurationCounts()
        #: Sessions waiting for a worker of their own, first come first served.
        self.reservations: deque[_Reservation] = deque()
        self.pacer = Pacer(self.collect, self._paced)
        self._quiet = trio.Event()

    def configure(self, config: PoolConfig) -> None:
        """Use new settings from now on (the size changes through the supervisor)."""
        self.config = config
        self.outcomes.config = config
        self.outcomes.failures.rate = config.output_rate
        self.max_queue = config.max_queue
        self.idle_spin = config.idle_spin
        self.max_actions = config.max_actions_per_worker
        #: Some job may have a time limit (skips looking for one in every batch otherwise).
        self.timeouts = config.action_timeout > 0 or getattr(self, "timeouts", False)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self.state == "running"

    @property
    def stopping(self) -> bool:
        return self.state in ("stopping", "stopped", "failed")

    def open_intake(self) -> None:
        """Every worker is ready: take work."""
        self.state = "running"

    def close_intake(self, *, follow_ups: bool) -> None:
        """Take no new work (`follow_ups`: but accepted actions' callbacks'); the rest runs."""
        if self.state in ("starting", "running"):
            self.state = "draining"
        self.follow_ups = self.follow_ups or follow_ups

    async def wait_quiet(self) -> None:
        """Return once every accepted action has its outcome: nothing queued, and nothing
        in flight but answers nobody waits for (cancelled, timed out, withdrawn)."""
        self._quiet = trio.Event()
        self._check_quiet()
        await self._quiet.wait()

    def _check_quiet(self) -> None:
        if not self.queue.live and not any(map(self.outcomes.waiting, self.live)):
            self._quiet.set()

    def begin_stop(self, message: str) -> list[WorkerHandle]:
        """Stop: what is still queued ends `shutting_down`; the live workers, taken out of
        dispatch, are returned for the supervisor to stop (some may be on their way out)."""
        if self.state != "failed":
            self.state = "stopping"
        self.outcomes.end_all(self.queue.clear(), message)
        workers = list(self.live)
        for worker in workers:
            self.take_out(worker)
        return workers

    def fail(self, message: str) -> None:
        """The pool cannot go on: everything accepted ends now, every worker is stopped."""
        self.state = "failed"
        self.outcomes.end_all(self.queue.clear(), message)
        self.outcomes.end_running(message)
        for worker in list(self.live):
            self.stop_worker(worker, "stopping")

    def finish(self) -> None:
        """Every worker has exited."""
        if self.state != "failed":
            self.state = "stopped"

    # -- accepting -----------------------------------------------------------------------

    def check_accepting(self, count: int = 1, *, follow_up: bool = False, size: int = 0) -> None:
        """Raise unless `count` more actions (of `size` bytes in all) may be queued now. A
        `follow_up` (an accepted action's callback's) is taken while draining if it said so."""
        if not self.accepting and not (follow_up and self.state == "draining" and self.follow_ups):
            if self.state == "starting" and not self.live:
                raise PoolClosed("the pool is not running")
            raise ShuttingDown("the pool is shutting down and takes no new actions")
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
        self.timeouts = self.timeouts or timeout > 0
        return float(timeout)

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

    def enqueue(self, job: Job) -> None:
        """Queue an accepted job, dispatching at once if a worker is free."""
        self.queue.push(job)
        self.dispatch()

    def submit_many(self, jobs: list[Job], payloads: list[bytes]) -> None:
        """Queue jobs (for `payloads`) of a bulk submitter, with one dispatch for all; as if
        they came one at a time: while the queue is empty each idle worker takes one first,
        so that a slow first action holds up nothing batched behind it."""
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

    def hold(self, sink: Sink) -> None:
        """Dispatch none of `sink`'s queued actions until `release(sink)`; others go past."""
        self.queue.hold(sink)

    def release(self, sink: Sink) -> None:
        self.queue.release(sink)
        self.dispatch()

    def cancel(self, job: Job) -> None:
        """The submitter withdrew `job` (see `Outcomes.cancel`)."""
        self.outcomes.cancel(job)
        if not self.accepting:
            self._check_quiet()

    def withdraw(self, sink: Sink) -> int:
        """Quietly give up every unanswered job of `sink` (see `Outcomes.withdraw`)."""
        count = self.outcomes.withdraw(sink)
        if not self.accepting:
            self._check_quiet()
        return count

    # -- sessions: a worker of one's own ---------------------------------------------------

    async def reserve(self) -> WorkerHandle:
        """A worker of one's own: an idle one now, or the next to become free (ahead of the
        queue: a freed worker goes to the oldest reservation first)."""
        self.check_accepting(0)
        if self.idle:
            worker = self.idle.pop()
            worker.reserved = True
            await trio.lowlevel.checkpoint()
            return worker
        reservation = _Reservation()
        self.reservations.append(reservation)
        try:
            await reservation.wakeup.wait()
        except BaseException:
            if reservation in self.reservations:
                self.reservations.remove(reservation)
            elif reservation.worker is not None:
                self.unreserve(reservation.worker)  # granted as we were cancelled
            raise
        assert reservation.worker is not None
        return reservation.worker

    def unreserve(self, worker: WorkerHandle) -> None:
        """Give a session's worker back to the pool."""
        worker.reserved = False
        worker.changed.wake()
        if not worker.dead and not worker.busy:
            self.make_available(worker)

    def run_reserved(self, worker: WorkerHandle, job: Job) -> None:
        """Send a session's job to its worker (which runs nothing else)."""
        self.submitted += 1
        self.send(worker, [job], [job.payload])

    def _grant(self, worker: WorkerHandle) -> bool:
        """Give `worker` to the oldest waiting session, if any."""
        if not self.reservations:
            return False
        reservation = self.reservations.popleft()
        worker.reserved = True
        reservation.worker = worker
        reservation.wakeup.wake()
        return True

    # -- workers ---------------------------------------------------------------------------

    def add_worker(self, worker: WorkerHandle) -> None:
        """A worker passed its handshake: it takes work from now on."""
        self.live.add(worker)
        self.make_available(worker)

    def make_available(self, worker: WorkerHandle) -> None:
        """An idle worker (new, or back from a session) takes work from now on."""
        if not self._grant(worker):
            self.idle.append(worker)
            self.dispatch()

    def take_out(self, worker: WorkerHandle) -> None:
        """No more work for this worker."""
        worker.dead = True
        if worker in self.idle:
            self.idle.remove(worker)

    def stop_worker(self, worker: WorkerHandle, doom: Doom) -> None:
        """Stop a worker now, whatever it runs: SIGTERM, `pool.kill_timeout`, SIGKILL."""
        worker.doom_as(doom)
        self.take_out(worker)
        stop = partial(stop_worker, slot=worker.slot, reason=worker.doom)
        self.nursery.start_soon(stop, worker.proc, self.config.kill_timeout, worker.exited.wait)

    def worker_exited(self, worker: WorkerHandle, status: ExitStatus) -> tuple[str, bool]:
        """The process is gone: read what it wrote, give each action it held its outcome;
        what it was doing, and whether it crashed (exited by itself, or broke the protocol,
        while the pool ran)."""
        self.take_out(worker)
        self.collect(worker)
        worker.close()
        self.live.discard(worker)
        crashed = worker.doom in (None, "protocol error") and not self.stopping
        doing, requeue = self.outcomes.on_exit(worker, status, self.stopping)
        if requeue:
            self.queue.requeue(requeue)
        if self.stopping:
            self.outcomes.end_all(self.queue.clear(), "the pool stopped before the action ran")
        else:
            self.dispatch()
        if not self.accepting:
            self._check_quiet()
        return doing, crashed

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

    def borrowable(self) -> WorkerHandle | None:
        """An idle worker the caller may run one action on itself (see `_calls`), taken out
        of the idle list; None unless the pool is idle and nothing is queued."""
        idle = self.idle
        if idle and not self.queue.live and idle[-1].reader.waiting:
            return idle.pop()
        return None

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
            self.nursery.start_soon(flush, worker)
        if not worker.borrowed:
            worker.reader.wake()

    # -- answers in ------------------------------------------------------------------------

    async def read(self, worker: WorkerHandle, *, task_status: Any) -> None:
        """The worker's reader task (see `_channel.read`)."""
        await read(worker, self.on_data, self._paced, self.pacer.hand_over, task_status)

    def collect(self, worker: WorkerHandle) -> None:
        """Read whatever `worker` has written, without waiting (all of it, after its exit)."""
        collect(worker, self.on_data)

    def _paced(self, worker: WorkerHandle) -> bool:
        # By the workers' timings: the time between reads is the master's as much as theirs.
        return should_pace(worker, min(self.action_seconds, self.durations.recent.seconds))

    def on_data(self, worker: WorkerHandle, n: int) -> None:
        """`n` more bytes from `worker`: deliver every answer they complete."""
        frames = worker.frames
        inflight = worker.inflight
        pos = start = worker.pos
        try:
            chunk = frames.take(n)
            if not chunk:
                return
            joined = wire.join_done(chunk)
            if joined is None and (split := wire.split_timed(chunk)) is not None:
                # A read that ends a batch: its answers and the batch's timings.
                chunk, timed = split
                self.durations.add_frames(timed)
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
            self.outcomes.protocol_violation(worker, "an answer with no action in flight")
            return
        except wire.ProtocolError as exc:
            worker.pos = pos
            self.outcomes.protocol_violation(worker, str(exc))
            return
        if pos == start:
            if pos == len(inflight):
                self._worker_free(worker)  # a Retire or a Cut alone ended the batch
            return
        worker.pos = pos
        done = pos - start
        worker.answered += done
        self.answers += done
        now = trio.current_time()
        # How long an action takes, smoothed: the time since this worker's previous answers
        # (or the send) shared among the answers of this read.
        per_action = (now - worker.head_started) / done
        self.action_seconds += (per_action - self.action_seconds) * 0.1
        self.quick_share += ((per_action <= self.idle_spin) - self.quick_share) * 0.1
        # Answers' size, smoothed, but quick to rise: a client slow to read large results
        # must not find a batch's worth of them piled up in the master (`batch_length`).
        size = len(chunk) / done
        self.result_bytes = max(size, self.result_bytes + (size - self.result_bytes) * 0.1)
        worker.head_started = now
        if self.max_actions and worker.answered >= self.max_actions and worker.retire is None:
            worker.dead = True  # spent: no more work; it leaves when its turn to recycle comes
            worker.ask_retire(
                f"answered {worker.answered} actions "
                f"(pool.max_actions_per_worker = {self.max_actions})"
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
        end = self.outcomes.end
        if kind is wire.Raised:
            self.outcomes.raised(inflight[pos], worker, m)
            return pos + 1
        if kind is wire.Unencodable:
            end(
                inflight[pos],
                BadResult(f"the handler's result cannot be sent: {m.message}"),
                worker,
            )
            return pos + 1
        if kind is wire.Refused:
            self.outcomes.refused(inflight[pos], worker, m.message)
            return pos + 1
        if kind is wire.Cut or kind is wire.Retire:
            # The worker stops the batch here (its results passed the batch's budget, or it
            # asks to be replaced): the rest never started and goes back to the head of the
            # queue. A retiring worker takes no more work and is replaced.
            rest = [job for job in inflight[pos:] if job.sink is not self.discard]
            worker.inflight = inflight[:pos]
            if kind is wire.Retire:
                worker.dead = True
            if rest:
                self.queue.requeue(rest)
                if kind is wire.Retire:
                    self.dispatch()
            if kind is wire.Retire:
                worker.ask_retire(m.reason)
        elif kind is wire.Progress:
            job = inflight[pos]  # none running: IndexError, a protocol violation
            if len(m.value) > wire.MAX_PROGRESS_BYTES:
                raise wire.ProtocolError(f"a progress value of {len(m.value)} bytes")
            report = getattr(job.sink, "progress", None)
            if report is not None:
                report(job, m.value)
        elif kind is wire.Timed:
            self.durations.add(m)
        elif kind is wire.Log:
            relay(log, m.level, m.event, m.fields, slot=worker.slot, pid=worker.pid)
        else:
            self.outcomes.protocol_violation(worker, f"unexpected {kind.__name__} message")
        return pos

    def _worker_free(self, worker: WorkerHandle) -> None:
        worker.inflight = EMPTY
        worker.pos = 0
        if worker.timed:
            worker.timed = False
            self.arm(worker)
        if worker.dead or worker.reserved:
            worker.changed.wake()
            if not self.accepting:
                self._check_quiet()
            return
        if self._grant(worker):
            return
        if self.queue.live:
            batch = self.take_batch(self.allowance(worker))
            if batch[0]:
                self.send(worker, *batch)
                return
        self.idle.append(worker)
        if not self.accepting:
            self._check_quiet()

    def arm(self, worker: WorkerHandle) -> None:
        """Set the worker's timer (`Outcomes.watch_deadline`) to its running action's limit."""
        timer = worker.timer
        if timer is not None:
            timer.deadline = worker.deadline()


class _Reservation:
    """A session waiting for a worker of its own."""

    __slots__ = ("wakeup", "worker")

    def __init__(self) -> None:
        self.wakeup = Wakeup()
        self.worker: WorkerHandle | None = None
