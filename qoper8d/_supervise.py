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

import os
import time
from collections import deque
from typing import Any, Literal

import msgspec
import structlog
import trio

from qoper8d import wire
from qoper8d._channel import read_some
from qoper8d._engine import Engine
from qoper8d._handle import Doom, WorkerHandle, frame_limit
from qoper8d._output import pump_output
from qoper8d._policy import Backoff, RestartIntensity
from qoper8d._process import ExitStatus, Launcher, stop_worker
from qoper8d.config import SupervisorConfig
from qoper8d.errors import RestartIntensityExceeded, WorkerStartError
from qoper8d.monitor import relay
from qoper8d.stats import RECENT_EXITS, WorkerExit

__all__ = ["Slot", "Supervisor"]

log = structlog.get_logger("qoper8d.pool")


#: What a slot is doing (idle and busy come from its worker).
SlotState = Literal["starting", "running", "backoff", "stopped"]


class Slot:
    """A place in the pool: stable number, counters, and the worker it runs now."""

    __slots__ = (
        "_done_before",
        "_serving",
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
        #: The worker it runs now (while one is recycled, its replacement).
        self.worker: WorkerHandle | None = None
        self.state: SlotState = "starting"
        #: Its live workers (two for a moment while one is recycled), and the actions
        #: answered by those that have left.
        self._serving: list[WorkerHandle] = []
        self._done_before = 0
        self.restarts = 0
        self.backoff = Backoff(supervisor)
        self.retired = False
        #: Set once the slot's task has ended.
        self.gone = trio.Event()

    @property
    def actions_done(self) -> int:
        """Actions the slot's workers have answered, over every replacement."""
        return self._done_before + sum(worker.answered for worker in self._serving)

    def serves(self, worker: WorkerHandle) -> None:
        """`worker` serves in this slot from now on."""
        self._serving.append(worker)
        self.worker = worker
        self.state = "running"

    def left(self, worker: WorkerHandle) -> None:
        """`worker` has exited; its answers stay counted."""
        if worker in self._serving:
            self._serving.remove(worker)
            self._done_before += worker.answered
        if self.worker is worker:
            self.worker = None


class _HandshakeEOF(Exception):
    """The worker closed its channel before the handshake."""


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
        #: The last `RECENT_EXITS` worker exits, oldest first (for operators' views).
        self.recent_exits: deque[WorkerExit] = deque(maxlen=RECENT_EXITS)

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
                    await self._install(slot, new, nursery)
                    if first:
                        first = False
                        task_status.started()
                    if self._leaving(slot):  # scaled down while it started
                        nursery.start_soon(self.retire, new, "scaled down")
                    await self._watch(slot, new, nursery)
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

    async def _watch(self, slot: Slot, worker: WorkerHandle, nursery: trio.Nursery) -> None:
        """Until `slot`'s worker exits: recycle it whenever it asks; back off after a crash."""
        while True:
            await worker.attention.wait()
            if not worker.exited.is_set():
                worker = await self._recycle(slot, worker, nursery)
                continue
            if worker.crashed and not self._leaving(slot):
                await self._after_crash(slot, trio.current_time() - worker.ready_at)
            return

    def _leaving(self, slot: Slot) -> bool:
        return self.engine.stopping or slot.retired

    async def _install(self, slot: Slot, worker: WorkerHandle, nursery: trio.Nursery) -> None:
        """The worker serves in `slot` from now on: its tasks run and the engine may use it."""
        slot.serves(worker)
        await nursery.start(self._serve_worker, slot, worker)

    async def _serve_worker(self, slot: Slot, worker: WorkerHandle, *, task_status: Any) -> None:
        """Read its answers, enforce its deadlines, wait for its exit, account for it."""
        engine = self.engine
        try:
            async with trio.open_nursery() as tasks:
                await tasks.start(engine.outcomes.watch_deadline, worker)
                await tasks.start(engine.read, worker)
                engine.add_worker(worker)
                task_status.started()
                status = await worker.proc.wait()
                tasks.cancel_scope.cancel()
        except BaseException:
            # Torn down from outside (the pool is failing or being cancelled): the process
            # must not outlive us. That is a stop, not a crash.
            worker.doom_as("stopping")
            with trio.CancelScope(shield=True):
                await stop_worker(worker.proc, 0.0, worker.proc.wait, now=True)
                status = await worker.proc.wait()
            self._account(slot, worker, status)
            raise
        self._account(slot, worker, status)

    async def _recycle(self, slot: Slot, old: WorkerHandle, nursery: trio.Nursery) -> WorkerHandle:
        """Replace `old`, which asked to retire: the new worker serves before the old leaves."""
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
            await self._install(slot, new, nursery)
            await self.retire(old, "retired")
        return new

    async def retire(self, worker: WorkerHandle, doom: Doom) -> None:
        """Stop a worker between actions: no new work; its batch ends; `teardown()`; exit."""
        # A session keeps its worker to the end of its block.
        while worker.reserved and not worker.exited.is_set():
            await worker.changed.wait()
        self.engine.take_out(worker)
        worker.doom_as(doom)
        while worker.busy and not worker.exited.is_set():
            await worker.changed.wait()
        if not worker.exited.is_set():
            await self._stop_between_actions(worker)

    async def _stop_between_actions(self, worker: WorkerHandle) -> None:
        """An idle worker runs `teardown()` and exits when told (`Stop`); then as any stop."""
        try:
            os.write(worker.wfd, wire.encode_frame(wire.Stop()))
        except OSError:
            asked = False  # its channel is gone: signals, then
        else:
            asked = True
        await stop_worker(
            worker.proc,
            self.engine.config.kill_timeout,
            worker.exited.wait,
            asked=asked,
            slot=worker.slot,
            reason=worker.doom,
        )

    async def scale(self, size: int, nursery: trio.Nursery) -> None:
        """Grow to `size` slots or shrink to it; returns when the pool has that size: the new
        workers serve, or the retired ones have left (idle ones first, busy ones after their
        batch; none is killed)."""
        engine = self.engine
        live = [slot for slot in self.slots if not slot.retired]
        engine.size = size
        if size > len(live):
            await self._grow(size - len(live), nursery)
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

    async def _grow(self, count: int, nursery: trio.Nursery) -> None:
        """`count` new slots, started at once; the pool keeps those whose worker starts."""
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
            for _ in range(count):
                starting.start_soon(grow)
        if failures:
            engine = self.engine
            engine.size = len([slot for slot in self.slots if not slot.retired])
            raise WorkerStartError(
                f"{len(failures)} of {count} new workers could not start; the pool has "
                f"{engine.size}: {failures[0].message}",
                **failures[0].details,
            )

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
        """The pool cannot go on: end all accepted work, stop every worker."""
        self.failure = err
        self.engine.fail(f"the pool failed: {err}")

    async def _start_worker(self, slot: Slot) -> WorkerHandle:
        if slot.worker is None or slot.worker.exited.is_set():
            slot.state = "starting"
            slot.worker = None
        launched = trio.current_time()
        try:
            proc = await self.launcher.launch(msgspec.structs.replace(self.spec, slot=slot.index))
        except OSError as exc:
            # Out of descriptors (EMFILE) or processes (EAGAIN), most likely: a start that
            # failed, retried with backoff like any other — never the end of the daemon.
            raise WorkerStartError(
                f"the worker in slot {slot.index} could not be started: {exc.strerror or exc}"
            ) from None
        cfg = self.engine.config
        worker = WorkerHandle(proc, slot.index, frame_limit(cfg))
        for stream, fd in proc.output.items():
            self.engine.nursery.start_soon(
                pump_output, fd, stream, slot.index, proc.pid, cfg.output_rate
            )
        try:
            with trio.fail_after(cfg.start_timeout):
                await self._handshake(worker)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await stop_worker(proc, 0.0, proc.wait, now=True)
                status = await proc.wait()
            worker.close()
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
            n = read_some(worker)
            if n is None:
                continue
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
                    relay(log, m.level, m.event, m.fields, slot=worker.slot, pid=worker.pid)
                else:
                    raise wire.ProtocolError(f"unexpected {type(m).__name__} before Ready")

    def _account(self, slot: Slot, worker: WorkerHandle, status: ExitStatus) -> None:
        """The process is gone: the engine gives each action its outcome; log it."""
        engine = self.engine
        doing, crashed = engine.worker_exited(worker, status)
        slot.left(worker)
        worker.exited_as(crashed)
        reason = worker.doom or ("shutdown" if engine.stopping else "crash")
        self.recent_exits.append(
            WorkerExit(
                slot=slot.index,
                pid=worker.pid,
                exit=status.signal_name or status.exit_code,
                reason=reason,
                at=time.time(),
            )
        )
        (log.error if crashed else log.info)(
            "worker.exit",
            slot=slot.index,
            pid=worker.pid,
            **status.details(),
            reason=reason,
            doing=doing or "idle",
            ran_for=round(trio.current_time() - worker.ready_at, 3),
        )

    # -- stopping ------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Stop intake; let work finish for `grace` seconds; stop every worker; wait."""
        engine = self.engine
        engine.close_intake(follow_ups=False)
        with trio.move_on_after(grace):
            await engine.wait_quiet()
        workers = engine.begin_stop("the pool stopped before the action could run")
        async with trio.open_nursery() as stopping:
            for worker in workers:
                worker.doom_as("stopping")
                if worker.busy:
                    stopping.start_soon(self._stop_now, worker)
                else:
                    stopping.start_soon(self._stop_between_actions, worker)
        engine.finish()

    async def _stop_now(self, worker: WorkerHandle) -> None:
        await stop_worker(
            worker.proc,
            self.engine.config.kill_timeout,
            worker.exited.wait,
            slot=worker.slot,
            reason=worker.doom,
        )
