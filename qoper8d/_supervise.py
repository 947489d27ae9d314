"""Supervision: one task per slot starts its worker, watches it, and replaces it.

A slot's task launches a worker, waits for its ready handshake (bounded by
`pool.start_timeout`), hands it to the engine, and then waits for the process to exit
through its pidfd — no polling. On exit it reads whatever the worker wrote before dying,
lets the engine give each action in flight its outcome, logs one `worker.exit` event, and
starts a replacement in the same slot: at once after a stable run, with capped exponential
backoff when the slot keeps crashing, and not at all once the pool-wide restart intensity is
exceeded. Intentional stops (timeouts, cancellations, recycling, scaling down, shutdown)
never count as crashes.

Each worker is served by its own task (reader, deadline timer, exit watch) in its slot's
nursery, so a slot can hold two workers for a moment: recycling starts the replacement,
swaps it in as soon as it is ready, and only then lets the old worker finish its batch,
run `teardown()` and exit. One slot recycles at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import structlog
import trio

from qoper8d import wire
from qoper8d._engine import Engine
from qoper8d._handle import WorkerHandle, frame_limit
from qoper8d._output import pump_output
from qoper8d._policy import Backoff, RestartIntensity
from qoper8d._process import ExitStatus, Launcher
from qoper8d.config import SupervisorConfig
from qoper8d.errors import RestartIntensityExceeded, ShuttingDown, WorkerStartError
from qoper8d.monitor import relay

__all__ = ["Slot", "Supervisor"]

log = structlog.get_logger("qoper8d.pool")


class Slot:
    """A place in the pool: stable number, counters, and the worker it runs now."""

    __slots__ = (
        "actions_done",
        "backoff",
        "gone",
        "index",
        "restarts",
        "retired",
        "state",
        "worker",
    )

    def __init__(self, index: int, supervisor: SupervisorConfig) -> None:
        self.index = index
        self.worker: WorkerHandle | None = None
        #: "starting", "running", "backoff" or "stopped" (idle/busy come from the worker).
        self.state = "starting"
        self.actions_done = 0
        self.restarts = 0
        self.backoff = Backoff(supervisor)
        self.retired = False
        #: Set once the slot's task has ended.
        self.gone = trio.Event()


class _HandshakeEOF(Exception):
    """The worker closed its channel before the handshake."""


async def _changed(worker: WorkerHandle) -> None:
    worker.changed = trio.Event()
    await worker.changed.wait()


def _close_channel(worker: WorkerHandle) -> None:
    # Wake, with ClosedResourceError, any task still waiting on these descriptors.
    for fd in (worker.rfd, worker.wfd):
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


class Supervisor:
    """The slots and their tasks; restart policy; stopping every worker."""

    def __init__(
        self,
        engine: Engine,
        launcher: Launcher,
        config: SupervisorConfig,
        spec: wire.WorkerSpec,
    ) -> None:
        self.engine = engine
        self.launcher = launcher
        self.config = config
        self.spec = spec
        self.slots: list[Slot] = []
        self.recycling = trio.Lock()
        self.intensity = RestartIntensity(config)
        self.restarts = 0
        self.failure: BaseException | None = None

    def configure(self, config: SupervisorConfig) -> None:
        """Use new settings from now on; crash history and backoff streaks carry over."""
        self.config = config
        self.intensity.config = config
        for slot in self.slots:
            slot.backoff.config = config

    def new_slot(self) -> Slot:
        """A slot with the lowest free number."""
        used = {slot.index for slot in self.slots}
        slot = Slot(min(set(range(len(used) + 1)) - used), self.config)
        self.slots.append(slot)
        self.slots.sort(key=lambda s: s.index)
        return slot

    async def serve_slot(self, slot: Slot, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker running in `slot` until the pool stops or the slot is retired."""
        first = True
        try:
            async with trio.open_nursery() as nursery:
                while not self._leaving(slot):
                    try:
                        new = await self._start_worker(slot)
                    except WorkerStartError as exc:
                        if first:
                            raise
                        log.error("worker.start_failed", slot=slot.index, error=exc.message)
                        await self._after_crash(slot, ran_for=0.0)
                        continue
                    await self._install(new, nursery)
                    if first:
                        first = False
                        task_status.started()
                    if self._leaving(slot):  # scaled down while it started
                        nursery.start_soon(self.retire, new, "scaled down")
                    worker: WorkerHandle | None = new
                    while worker is not None:
                        await worker.attention.wait()
                        if worker.exited.is_set():
                            if worker.crashed and not self._leaving(slot):
                                ran_for = trio.current_time() - worker.ready_at
                                await self._after_crash(slot, ran_for)
                            worker = None
                        else:
                            worker = await self._recycle(worker, nursery)
                if first:
                    # Left before its first worker served (the pool is stopping): a slot that
                    # starts nothing has still started, for whoever waits for it.
                    task_status.started()
        finally:
            slot.state = "stopped"
            slot.worker = None
            if slot.retired and slot in self.slots:
                self.slots.remove(slot)
            slot.gone.set()

    def _leaving(self, slot: Slot) -> bool:
        return self.engine.stopping or slot.retired

    async def _install(self, worker: WorkerHandle, nursery: trio.Nursery) -> None:
        """The worker serves from now on: its tasks run and the engine may use it."""
        slot = worker.slot
        slot.worker = worker
        slot.state = "running"
        await nursery.start(self._serve_worker, worker)

    async def _serve_worker(self, worker: WorkerHandle, *, task_status: Any) -> None:
        """Read its answers, enforce its deadlines, wait for its exit, account for it."""
        engine = self.engine
        try:
            async with trio.open_nursery() as tasks:
                await tasks.start(engine.watch_deadline, worker)
                await tasks.start(engine.read, worker)
                engine.add_worker(worker)
                task_status.started()
                status = await worker.proc.wait()
                tasks.cancel_scope.cancel()
        except BaseException:
            # Torn down from outside (the pool is failing or being cancelled): the process
            # must not outlive us. That is a stop, not a crash.
            worker.doom = worker.doom or "stopping"
            worker.proc.signal(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                status = await worker.proc.wait()
            self._account(worker, status)
            raise
        self._account(worker, status)

    async def _recycle(self, old: WorkerHandle, nursery: trio.Nursery) -> WorkerHandle:
        """Replace `old`, which asked to retire: the new worker serves before the old leaves."""
        slot = old.slot
        async with self.recycling:
            if old.exited.is_set() or self.engine.stopping or slot.retired:
                return old
            log.info("worker.recycle", slot=slot.index, pid=old.pid, reason=old.retire)
            try:
                new = await self._start_worker(slot)
            except WorkerStartError as exc:
                log.error("worker.recycle_failed", slot=slot.index, pid=old.pid, error=exc.message)
                if not old.exited.is_set():
                    old.attention = trio.Event()  # it keeps serving; it will not ask again
                return old
            await self._install(new, nursery)
            await self.retire(old, "retired")
        return new

    async def retire(self, worker: WorkerHandle, doom: str) -> None:
        """Stop a worker between actions: no new work; its batch ends; `teardown()`; exit."""
        engine = self.engine
        # A session keeps its worker to the end of its block.
        while worker.reserved and not worker.exited.is_set():
            await _changed(worker)
        engine.take_out(worker)
        if worker.doom is None:
            worker.doom = doom
        while worker.busy and not worker.exited.is_set():
            await _changed(worker)
        if not worker.exited.is_set():
            with contextlib.suppress(OSError):
                os.write(worker.wfd, wire.encode_frame(wire.Stop()))
            await engine.escalate(worker, first=0)

    async def scale(self, size: int, nursery: trio.Nursery) -> None:
        """Grow to `size` slots or shrink to it; returns when the pool has that size: the new
        workers serve, or the retired ones have left (idle ones first, busy ones after their
        batch; none is killed)."""
        engine = self.engine
        live = [slot for slot in self.slots if not slot.retired]
        engine.size = size
        if size > len(live):
            failures: list[WorkerStartError] = []

            async def grow() -> None:
                slot = self.new_slot()
                try:
                    await nursery.start(self.serve_slot, slot)
                except WorkerStartError as exc:
                    failures.append(exc)
                    if slot in self.slots:
                        self.slots.remove(slot)

            async with trio.open_nursery() as starting:
                for _ in range(size - len(live)):
                    starting.start_soon(grow)
            if failures:
                engine.size = len([slot for slot in self.slots if not slot.retired])
                raise WorkerStartError(
                    f"{len(failures)} of {size - len(live)} new workers could not start; the "
                    f"pool has {engine.size}: {failures[0].message}",
                    **failures[0].details,
                )
        elif size < len(live):

            def busy_last(slot: Slot) -> tuple[bool, int]:
                worker = slot.worker
                serving = worker is not None and slot.state == "running"
                return (serving and worker is not None and worker.busy, -slot.index)

            leaving = sorted(live, key=busy_last)[: len(live) - size]
            async with trio.open_nursery() as retiring:
                for slot in leaving:
                    slot.retired = True
                    if slot.worker is not None and slot.state == "running":
                        retiring.start_soon(self.retire, slot.worker, "scaled down")
            for slot in leaving:
                await slot.gone.wait()
        await trio.lowlevel.checkpoint()

    async def _after_crash(self, slot: Slot, ran_for: float) -> None:
        slot.restarts += 1
        self.restarts += 1
        if self.intensity.record(trio.current_time()):
            cfg = self.config
            err = RestartIntensityExceeded(
                f"more than {cfg.max_restarts} worker crashes within "
                f"{cfg.restart_window:g} s (supervisor.max_restarts, "
                f"supervisor.restart_window): giving up instead of restarting in a loop",
                max_restarts=cfg.max_restarts,
                restart_window=cfg.restart_window,
            )
            log.critical("pool.restart_intensity_exceeded", error=err.message)
            self.fail(err)
            raise err
        delay = slot.backoff.delay_after_crash(ran_for)
        if delay > 0:
            slot.state = "backoff"
            log.warning(
                "worker.backoff", slot=slot.index, delay=round(delay, 3), streak=slot.backoff.streak
            )
            await trio.sleep(delay)

    def fail(self, err: BaseException) -> None:
        """The pool cannot go on: end all queued work, stop every worker."""
        engine = self.engine
        self.failure = err
        engine.accepting = False
        engine.stopping = True
        message = f"the pool failed: {err}"
        engine.end_queued(message)
        # Everything in flight gets its outcome now, while whoever waits for it can still
        # hear it; the workers are killed next, and their exits deliver nothing more.
        for worker in list(engine.live):
            for job in worker.inflight[worker.pos :]:
                if job.sink is not engine.discard:
                    engine.end(job, ShuttingDown(message, pid=worker.pid), worker)
                    job.sink = engine.discard
            engine.kill(worker, "stopping")

    async def _start_worker(self, slot: Slot) -> WorkerHandle:
        if slot.worker is None or slot.worker.exited.is_set():
            slot.state = "starting"
            slot.worker = None
        launched = trio.current_time()
        try:
            proc = await self.launcher.launch(self.spec)
        except OSError as exc:
            # Out of descriptors (EMFILE) or processes (EAGAIN), most likely: a start that
            # failed, retried with backoff like any other — never the end of the daemon.
            raise WorkerStartError(
                f"the worker in slot {slot.index} could not be started: {exc.strerror or exc}"
            ) from None
        worker = WorkerHandle(proc, slot, frame_limit(self.engine.config))
        cfg = self.engine.config
        for stream, fd in proc.output.items():
            self.engine.nursery.start_soon(
                pump_output, fd, stream, slot.index, proc.pid, cfg.output_rate
            )
        try:
            with trio.fail_after(cfg.start_timeout):
                await self._handshake(worker)
        except BaseException as exc:
            proc.signal(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                status = await proc.wait()
            _close_channel(worker)
            if isinstance(exc, trio.TooSlowError):
                raise WorkerStartError(
                    f"the worker in slot {slot.index} did not report ready within "
                    f"{cfg.start_timeout:g} s (pool.start_timeout)"
                ) from None
            if isinstance(exc, _HandshakeEOF):
                raise WorkerStartError(
                    f"the worker in slot {slot.index} exited before it was ready ({status})",
                    **status.details(),
                ) from None
            if isinstance(exc, wire.ProtocolError):
                raise WorkerStartError(f"the worker in slot {slot.index}: {exc}") from None
            raise
        worker.ready_at = trio.current_time()
        log.info(
            "worker.ready",
            slot=slot.index,
            pid=worker.pid,
            started_in=round(worker.ready_at - launched, 4),
        )
        return worker

    async def _handshake(self, worker: WorkerHandle) -> None:
        rfd = worker.rfd
        while True:
            await trio.lowlevel.wait_readable(rfd)
            try:
                n = os.readv(rfd, [worker.frames.buffer()])
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if not n:
                raise _HandshakeEOF
            for m in worker.frames.commit(n):
                if isinstance(m, wire.Ready):
                    return
                if isinstance(m, wire.StartFailed):
                    raise WorkerStartError(
                        f"handler {self.spec.handler!r} failed to start: {m.type}: {m.message}",
                        type=m.type,
                        traceback=m.traceback,
                    )
                if isinstance(m, wire.Log):
                    relay(log, m.level, m.event, m.fields, slot=worker.slot.index, pid=worker.pid)
                else:
                    raise wire.ProtocolError(f"unexpected {type(m).__name__} before Ready")

    def _account(self, worker: WorkerHandle, status: ExitStatus) -> None:
        """The process is gone: read what it wrote, give each action its outcome, log it."""
        engine = self.engine
        engine.take_out(worker)
        engine.collect(worker)
        _close_channel(worker)
        engine.live.discard(worker)
        crashed = worker.doom is None and not engine.stopping
        worker.crashed = crashed
        doing = engine.on_exit(worker, status)
        worker.exited.set()
        worker.attention.set()
        if worker.changed is not None:
            worker.changed.set()
        (log.error if crashed else log.info)(
            "worker.exit",
            slot=worker.slot.index,
            pid=worker.pid,
            **status.details(),
            reason=worker.doom or ("shutdown" if engine.stopping else "crash"),
            doing=doing or "idle",
            ran_for=round(trio.current_time() - worker.ready_at, 3),
        )
        if engine.stopping:
            engine.end_queued("the pool stopped before the action could run")
        else:
            engine.dispatch()
        if not engine.accepting:
            engine.check_quiet()

    # -- stopping ------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Stop intake; let work finish for `grace` seconds; stop every worker; wait."""
        engine = self.engine
        engine.accepting = False
        engine.quiet = trio.Event()
        engine.check_quiet()
        with trio.move_on_after(grace):
            await engine.quiet.wait()
        engine.stopping = True
        engine.end_queued("the pool stopped before the action could run")
        for worker in list(engine.live):
            if worker.busy:
                engine.take_out(worker)
                worker.doom = worker.doom or "stopping"
                worker.proc.signal(signal.SIGTERM)
            elif not worker.dead:
                # Idle: it runs teardown() and exits by itself.
                engine.take_out(worker)
                worker.doom = "stopping"
                try:
                    os.write(worker.wfd, wire.encode_frame(wire.Stop()))
                except OSError:
                    worker.proc.signal(signal.SIGTERM)
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        """Escalate until every worker has exited: `kill_timeout` each for teardown/SIGTERM."""
        engine = self.engine
        kill_timeout = engine.config.kill_timeout
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with trio.move_on_after(kill_timeout):
                for worker in list(engine.live):
                    await worker.exited.wait()
                return
            for worker in list(engine.live):
                worker.proc.signal(signum)
        for worker in list(engine.live):
            await worker.exited.wait()
