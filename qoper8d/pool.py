"""The pool: persistent worker processes, a queue, event-driven dispatch, supervision.

`open_pool()` starts `pool.size` workers and returns only once every one has reported ready.
The pieces behind it, one idea each:

* `_engine`: the queue, adaptive batching, answers matched by position, outcomes;
* `_supervise`: one task per slot that starts, watches and replaces its worker;
* `_map`: the ordered, backpressured `map()` iterator;
* `_process`: spawning worker processes and waiting for them through pidfds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from itertools import repeat
from typing import Any

import msgspec
import trio

from qoper8d import _calls, wire
from qoper8d._classic import Callbacks, OnResponse, Session, open_session
from qoper8d._engine import Engine
from qoper8d._jobqueue import BATCH_RESULT_BYTES
from qoper8d._jobs import Job, Waiter, encode_action, encode_json
from qoper8d._map import MapIterator
from qoper8d._process import ForkServerLauncher, Launcher, SpawnLauncher, worker_environ
from qoper8d._supervise import Supervisor
from qoper8d.config import PoolConfig, SupervisorConfig, changes
from qoper8d.errors import BadRequest, WorkerStartError, single_error
from qoper8d.stats import PoolStatistics, WorkerStatistics

__all__ = ["MapIterator", "Pool", "Session", "check_handlers", "open_pool", "worker_spec"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


class Pool:
    """A running pool. Get one from `open_pool()`; use it from the trio run that opened it."""

    def __init__(self, engine: Engine, supervisor: Supervisor, launcher: Launcher) -> None:
        self._engine = engine
        self._supervisor = supervisor
        self._launcher = launcher
        self._callbacks = Callbacks(engine)
        self._started_at = trio.current_time()
        self._stopped: trio.Event | None = None
        #: Resizes and reconfigurations, one at a time, in the order they come.
        self._resizing = trio.StrictFIFOLock()

    @property
    def config(self) -> PoolConfig:
        return self._engine.config

    @property
    def size(self) -> int:
        return self._engine.size

    @property
    def state(self) -> str:
        """ "starting", "running", "draining", "stopping", "stopped" or "failed"."""
        return self._engine.state

    async def run(
        self,
        action: Any,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Run one action on a worker; return its result or raise its `ActionError`.

        `timeout` (seconds; 0 for none) overrides `pool.action_timeout`. Cancelling the call
        cancels the action: a queued one is removed, a running one's worker is replaced.
        Raises `QueueFull` at once when `pool.max_queue` actions are waiting already.
        `on_progress(value)` (sync or async) runs in this task for what the handler reports
        with `qoper8d.progress()`: best-effort, coalesced (latest wins), the last value
        reported always before the outcome. If it raises, the action is cancelled and the
        exception propagates.
        """
        # The hottest single-call path: inline, and without closures, so that a burst of
        # parked calls keeps as few objects alive as it can (see `Waiter`).
        engine = self._engine
        try:
            payload = encode_json(action)
        except (TypeError, ValueError, OverflowError, RecursionError):
            payload = encode_action(action)  # raises BadRequest, with the reason
        if on_progress is not None:
            return await _calls.run_watched(engine, payload, timeout, on_progress)
        waiter = Waiter()
        job = engine.accept(payload, waiter, None, timeout)
        worker = engine.borrowable()
        if worker is not None:
            await _calls.run_borrowed(engine, worker, job, waiter.is_done)
            if not waiter.done:
                # The worker died under us: the supervisor delivers the outcome, or a retry.
                await waiter.wait(engine, job)
            return waiter.outcome()
        engine.enqueue(job)
        await waiter.wait(engine, job)
        return waiter.outcome()

    def map(
        self,
        actions: Iterable[Any] | AsyncIterable[Any],
        *,
        window: int = 8192,
        return_exceptions: bool = False,
    ) -> MapIterator:
        """Run every action; an async iterator of their results, in order.

        At most `window` actions are queued or running at once: the source is read as the
        results are consumed. A failed action raises its `ActionError` at its position and
        ends the iteration, unless `return_exceptions` yields the error instead. After a
        `break`, another `async for` over the same iterator carries on where it stopped;
        `aclose()` (or `contextlib.aclosing`) withdraws what is still queued, and without it
        the actions already queued still run, their results unread.
        """
        return MapIterator(self._engine, actions, window, return_exceptions)

    def accept(
        self,
        action: Any,
        sink: Any,
        tag: Any = None,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
    ) -> Job:
        """Accept `action` for a front end (the control socket): its outcome will go to
        `sink`, not to an awaiting caller; `enqueue()` the job, or `run_here()` it.

        The result arrives as raw JSON text, for passing on as it came: `sink.result(job,
        raw, worker)`, `sink.results(jobs, raws, worker)` or `sink.error(job, err, worker)`,
        called synchronously, once per job. The action is encoded here, so a worker can
        always decode it. `max_attempts` overrides `pool.max_attempts`. The job is the
        handle for `cancel()`. Raises `QueueFull`, `ShuttingDown` or `BadRequest` at once,
        accepting nothing.
        """
        if max_attempts is not None and not 1 <= max_attempts <= 100:
            raise BadRequest("max_attempts must be an integer from 1 to 100")
        job = self._engine.accept(encode_action(action), sink, tag, timeout)
        if max_attempts is not None:
            job.max_attempts = max_attempts
        return job

    def enqueue(self, job: Job) -> None:
        """Queue an accepted job (it is dispatched at once if a worker is free)."""
        self._engine.enqueue(job)

    async def run_here(self, job: Job) -> None:
        """Run an accepted job: on an idle pool this task writes it to a worker and reads
        the answer itself (one task hop less for a front end's lone request), returning once
        the sink has it — or once `pool.idle_spin` has passed, when the pool's reader takes
        over. Otherwise it queues the job and returns at once."""
        engine = self._engine
        worker = engine.borrowable()
        if worker is None:
            engine.enqueue(job)
            return
        # Its batch is this one job: answered once the worker holds something else.
        await _calls.run_borrowed(
            engine,
            worker,
            job,
            lambda: not worker.inflight or worker.inflight[0] is not job,
            hand_over=True,
        )

    def accept_batch(self, actions: list[Any], sink: Any, tags: list[Any]) -> list[Job]:
        """`accept` and `enqueue` for many actions at once, all with the pool's time limit
        and attempts, with one dispatch. All or none: raises `QueueFull`, `ShuttingDown` or
        `BadRequest` without accepting any."""
        engine = self._engine
        try:
            payloads = list(map(encode_json, actions))
        except (TypeError, ValueError, OverflowError, RecursionError):
            payloads = list(map(encode_action, actions))  # raises BadRequest, with the reason
        engine.check_accepting(len(payloads), size=sum(map(len, payloads)))
        jobs = list(map(Job, payloads, repeat(sink), tags, repeat(engine.config.action_timeout)))
        engine.submit_many(jobs, payloads)
        return jobs

    def hold(self, sink: Any) -> None:
        """Dispatch none of `sink`'s queued actions, now or as they come, until
        `release(sink)`; other sinks' actions go past them (a client not reading its
        answers). They still count as queued."""
        self._engine.hold(sink)

    def release(self, sink: Any) -> None:
        """Dispatch `sink`'s actions again, those held first."""
        self._engine.release(sink)

    def withdraw(self, sink: Any) -> int:
        """Quietly give up every unanswered action of `sink` (its submitter is gone): queued
        ones never run, running ones finish unseen; all count as `cancelled`."""
        return self._engine.withdraw(sink)

    def cancel(self, handle: Any) -> None:
        """Cancel an accepted job whose outcome its sink has not been given yet (a no-op for
        one cancelled already). A front end knows which of its jobs are unanswered — its
        sink was told nothing of them — and cancels only those: jobs keep no per-action mark
        of having ended, which the bulk answer path would pay for on every action."""
        self._engine.cancel(handle)

    def add_to_queue(self, request: dict[str, Any], on_response: OnResponse) -> None:
        """Q-Oper8's way: queue `request["action"]`; the rest of `request` stays here.

        `on_response(request, result, pid)` — sync or async — runs in this process once the
        action ends: `result` is the handler's result, or the `ActionError` it ended with
        (`pid` is None if it never ran). Callbacks run one at a time in a task of the pool
        and may queue more actions; one that raises is logged (`pool.on_response_failed`).
        Raises `QueueFull` or `ShuttingDown` at once.
        """
        self._callbacks.add(request, on_response)

    def session(self) -> AbstractAsyncContextManager[Session]:
        """Reserve one worker for a sequence of actions: `async with pool.session() as w:
        await w.run(a); await w.run(b)` runs both on the same process (`w.pid`). Waits for
        a free worker (ahead of queued actions); the worker goes back to the pool when the
        block ends, however it ends."""
        return open_session(self._engine)

    async def scale(self, size: int) -> int:
        """Change the number of workers; returns the size reached, once the pool has it.

        Growing returns once the new workers serve, without touching the others; shrinking
        retires idle workers first and busy ones only after their batch (no action is
        killed or lost), and returns once they have left. Resizes and reconfigurations run
        one at a time, in the order they reach the pool. A new worker that cannot start
        raises `WorkerStartError`; the pool keeps those that did start.
        """
        if not 1 <= size <= 1024:
            raise BadRequest(f"size must be from 1 to 1024, not {size!r}")
        self._engine.check_accepting(0)
        async with self._resizing:
            try:
                await self._supervisor.scale(size, self._engine.nursery)
            finally:
                self._engine.config = msgspec.structs.replace(self.config, size=self.size)
        return self.size

    async def reconfigure(self, config: PoolConfig, supervisor: SupervisorConfig) -> list[str]:
        """Apply new settings. Queueing, batching, limits and supervision apply at once;
        a new size scales; anything a worker is started with (the handler, routes, paths,
        the async backend, the memory limit, the start method) applies by replacing every
        worker, one at a time, each replacement ready before its predecessor leaves. Runs
        in its turn among resizes, and compares with what runs (a `scale` included);
        returns what changed, as `section.key: old -> new` lines."""
        async with self._resizing:
            done = changes(self.config, config, "pool")
            done += changes(self._supervisor.config, supervisor, "supervisor")
            if done:
                await self._reconfigure(config, supervisor)
            return done

    async def _reconfigure(self, config: PoolConfig, supervisor: SupervisorConfig) -> None:
        engine, sup = self._engine, self._supervisor
        old_launcher = self._launcher
        relaunch = _launcher_settings(config) != _launcher_settings(engine.config)
        engine.configure(config)
        sup.configure(supervisor)
        if relaunch:
            self._launcher = default_launcher(config)
            await self._launcher.start(engine.nursery)
            sup.launcher = self._launcher
        spec = worker_spec(config)
        replace = relaunch or spec != sup.spec
        sup.spec = spec
        if config.size != engine.size:
            await sup.scale(config.size, engine.nursery)
        if replace:
            old = list(engine.live)
            for worker in old:
                worker.ask_retire("the configuration changed")
            for worker in old:
                await worker.exited.wait()
        if relaunch:
            await old_launcher.aclose()

    async def drain(self) -> None:
        """Stop intake (new actions end `shutting_down`) and return once every accepted
        action has ended and its callback, if any, has run. Workers stay up until `stop()`
        or the end of the `open_pool` block."""
        engine = self._engine
        engine.close_intake(follow_ups=True)
        while True:
            await engine.wait_quiet()
            if not self._callbacks.outstanding:
                return
            await self._callbacks.settled()

    async def stop(self, grace: float | None = None) -> None:
        """Stop now, gracefully: refuse new actions, give queued and running ones `grace`
        seconds (default `pool.grace_period`) to finish, end what is left `shutting_down`,
        stop the workers (`teardown()`, then SIGTERM, then SIGKILL). Idempotent."""
        await self._shutdown(self.config.grace_period if grace is None else grace)

    async def _shutdown(self, grace: float) -> None:
        if self._stopped is not None:
            await self._stopped.wait()
            return
        self._stopped = trio.Event()
        with trio.CancelScope(shield=True):
            await self._supervisor.stop(grace)
            await self._launcher.aclose()
        self._stopped.set()

    def heartbeat(self, answer: Callable[[], object]) -> None:
        """Call `answer()` from a new task in the nursery the supervision runs in, after
        its first checkpoint: proof that trio still schedules that nursery's tasks (the
        systemd watchdog asks for it). No answer once that nursery is cancelled;
        `RuntimeError` once it is closed."""

        async def beat() -> None:
            await trio.lowlevel.checkpoint()
            answer()

        self._engine.nursery.start_soon(beat)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the pool and every slot (see `PoolStatistics`)."""
        engine = self._engine
        now = trio.current_time()
        workers = []
        busy = idle = 0
        waiting = engine.outcomes.waiting
        # In flight: actions a worker holds that still wait for their outcome. One that has
        # its outcome already (timed out, cancelled, withdrawn) but whose worker still holds
        # it counts no more: outcomes, queued and in flight add up to what was submitted.
        in_flight = sum(len(waiting(w)) for w in engine.live)
        for slot in self._supervisor.slots:
            w = slot.worker
            if w is not None and not w.exited.is_set() and slot.state == "running":
                running = len(w.inflight) - w.pos
                flying = len(waiting(w))
                if w.doom is not None:
                    state = "retiring"
                elif running:
                    state = "busy"
                    busy += 1
                else:
                    state = "idle"
                    idle += 1
                record = WorkerStatistics(
                    slot=slot.index,
                    pid=w.pid,
                    state=state,
                    actions_done=slot.actions_done,
                    restarts=slot.restarts,
                    uptime=now - w.ready_at,
                    rss_bytes=_rss(w.pid),
                    running_for=now - w.head_started if running else None,
                    in_flight=flying,
                )
            else:
                record = WorkerStatistics(
                    slot=slot.index,
                    pid=None,
                    state=slot.state,
                    actions_done=slot.actions_done,
                    restarts=slot.restarts,
                    uptime=0.0,
                    rss_bytes=None,
                    running_for=None,
                    in_flight=0,
                )
            workers.append(record)
        outcomes = dict(engine.outcomes.counts)
        outcomes["result"] = engine.outcomes.results(engine.answers)
        return PoolStatistics(
            state=engine.state,
            size=engine.size,
            busy=busy,
            idle=idle,
            queued=engine.queue.live,
            queued_bytes=engine.queue.bytes,
            in_flight=in_flight,
            submitted=engine.submitted,
            outcomes=outcomes,
            restarts=self._supervisor.restarts,
            uptime=now - self._started_at,
            workers=tuple(workers),
            durations=engine.durations.snapshot(),
            recent_exits=tuple(self._supervisor.recent_exits),
        )


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@asynccontextmanager
async def open_pool(
    handler: str | None = None,
    *,
    config: PoolConfig | None = None,
    supervisor: SupervisorConfig | None = None,
    launcher: Launcher | None = None,
    **overrides: Any,
) -> AsyncIterator[Pool]:
    """Start a pool; returns once every worker has reported ready.

    `handler` and keyword arguments override fields of `config` (see `PoolConfig`), e.g.
    `open_pool("handlers.echo:handle", size=2)`. Leaving the block normally stops intake
    and gives queued and running work `grace_period` seconds to finish; leaving it by an
    exception or cancellation stops the workers at once. Either way, every worker process
    has exited before this returns. A worker that cannot start raises `WorkerStartError`;
    crashes past the restart intensity raise `RestartIntensityExceeded`.
    """
    cfg = config or PoolConfig()
    if handler is not None:
        overrides["handler"] = handler
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except (msgspec.ValidationError, TypeError) as exc:
            raise BadRequest(f"invalid pool setting: {exc}") from None
    sup_cfg = supervisor or SupervisorConfig()
    spec = worker_spec(cfg)
    launcher = launcher or default_launcher(cfg)
    try:
        async with trio.open_nursery() as nursery:
            engine = Engine(cfg, nursery)
            nursery.start_soon(engine.pacer.serve)
            sup = Supervisor(engine, launcher, sup_cfg, spec)
            pool = Pool(engine, sup, launcher)
            clean = False
            try:
                try:
                    await launcher.start(nursery)
                except OSError as exc:  # out of descriptors, say, for a launcher of one's own
                    raise WorkerStartError(f"cannot get ready to start workers: {exc}") from None
                async with trio.open_nursery() as starting:
                    for _ in range(cfg.size):
                        starting.start_soon(nursery.start, sup.serve_slot, sup.new_slot())
                engine.open_intake()
                yield pool
                clean = True
            finally:
                await pool._shutdown(cfg.grace_period if clean and sup.failure is None else 0)
                await pool._callbacks.flush(cfg.kill_timeout)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_error(group) from None


def worker_spec(config: PoolConfig) -> wire.WorkerSpec:
    """What each worker is started with (its descriptors are filled in at launch)."""
    return wire.WorkerSpec(
        from_master_fd=-1,
        to_master_fd=-1,
        lifeline_fd=-1,
        handler=config.handler,
        routes=dict(config.routes),
        handler_path=list(config.handler_path),
        async_backend=config.async_backend,
        max_rss_bytes=config.max_worker_rss_mb << 20,
        idle_spin=config.idle_spin,
        max_result_bytes=config.max_result_bytes,
        batch_result_bytes=BATCH_RESULT_BYTES,
    )


def _launcher_settings(config: PoolConfig) -> tuple[Any, ...]:
    preloaded = (config.handler, tuple(sorted(config.routes.items()))) if config.preload else ()
    return (config.start_method, config.preload, tuple(config.handler_path), preloaded)


def default_launcher(config: PoolConfig) -> Launcher:
    """The launcher `pool.start_method` names."""
    if config.start_method == "spawn":
        return SpawnLauncher()
    handlers = [config.handler, *config.routes.values()]
    return ForkServerLauncher(
        preload=sorted({h.partition(":")[0] for h in handlers}) if config.preload else [],
        handler_path=list(config.handler_path),
        start_timeout=config.start_timeout,
    )


def check_handlers(config: PoolConfig) -> list[str]:
    """Load the handler and every route as a worker would, `setup()` included; one line
    per problem.

    It runs in a throwaway `python -m qoper8d._check`, so the handler's side effects
    (threads, sockets, module state) never touch the caller.
    """
    command = [
        sys.executable,
        "-m",
        "qoper8d._check",
        msgspec.json.encode(worker_spec(config)).decode(),
    ]
    try:
        done = subprocess.run(
            command,
            env=worker_environ(),  # it runs setup(): a worker in all but name
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="backslashreplace",
            timeout=config.start_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [
            "pool.handler: importing it and its setup() took longer than pool.start_timeout "
            f"({config.start_timeout} s)"
        ]
    if done.returncode == 0:
        return []
    # The worker's verdict is its last line; anything the handler printed while importing
    # comes before it.
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return [lines[-1] if lines else f"pool.handler: the check exited with {done.returncode}"]
