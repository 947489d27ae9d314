"""The worker process: runs one action at a time for the master.

Started as `python -m qoper8d.worker SPEC_JSON`. It imports only the standard library,
msgspec, `qoper8d.wire` and the handler, so it starts fast and shares nothing with the master.

Life of a worker:
1. Arm the lifeline: a pipe whose write end only the master holds. The read end is set to
   O_ASYNC with our process group as owner, and SIGIO keeps its default action (terminate),
   so when the master dies — even by SIGKILL — the kernel kills this worker and anything it
   forked, whatever the handler is doing at that moment: no thread, no GIL, no polling.
2. Import the handler(s), run the module's `setup()`, send `Ready`.
3. Read batches; run each action in order; write its outcome frame before starting the next
   one, so the master always knows which action a death interrupted.
4. On `Stop`, run `teardown()` and exit 0; on end-of-file on the channel, exit at once.

The channel is two pipes (fd 3 from the master, fd 4 to it) and the lifeline is fd 5.

SIGINT is ignored (Ctrl-C belongs to the master); stdout and stderr are pipes the master
reads and logs, line by line, tagged with this worker's slot and pid.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import importlib
import inspect
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import msgspec

from qoper8d import _report, wire

__all__ = [
    "EXIT_LOST_MASTER",
    "EXIT_START_FAILED",
    "HandlerLoadError",
    "arm_lifeline",
    "extend_path",
    "load_handler",
    "main",
    "serve",
]

#: The handler could not be imported or `setup()` raised (a `StartFailed` frame says why).
EXIT_START_FAILED = 3
#: The channel to the master closed: the master is gone or gave up on us.
EXIT_LOST_MASTER = 4

Handler = Callable[[Any], Any]
T = TypeVar("T")


class HandlerLoadError(Exception):
    """A handler name that does not resolve to a callable; the message says which part."""


def load_handler(name: str) -> Handler:
    """Import `"package.module:function"` and return the callable, with a precise error."""
    module_name, sep, attr_path = name.partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerLoadError(f"handler {name!r} must be written 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name) and exc.name != "":
            raise HandlerLoadError(
                f"handler {name!r}: no module named {exc.name!r} "
                f"(searched {os.getcwd()!r}, PYTHONPATH and pool.handler_path)"
            ) from None
        raise
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerLoadError(
                f"handler {name!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise HandlerLoadError(f"handler {name!r} is not callable")
    return target  # type: ignore[no-any-return]


class _Handlers:
    """The default handler, its routes (by an action's "type"), and their modules' hooks."""

    def __init__(self, spec: wire.WorkerSpec) -> None:
        self.default = load_handler(spec.handler)
        self.routes = {kind: load_handler(name) for kind, name in spec.routes.items()}
        modules: dict[str, Any] = {}
        for fn in (self.default, *self.routes.values()):
            module = sys.modules.get(getattr(fn, "__module__", ""), None)
            if module is not None:
                modules.setdefault(module.__name__, module)
        self.modules = list(modules.values())
        self.is_async = any(
            inspect.iscoroutinefunction(fn) for fn in (self.default, *self.routes.values())
        )

    def pick(self, action: Any) -> Handler:
        if self.routes and type(action) is dict:
            return self.routes.get(action.get("type"), self.default)  # type: ignore[arg-type]
        return self.default

    def hooks(self, name: str) -> list[Callable[[], Any]]:
        return [hook for m in self.modules if callable(hook := getattr(m, name, None))]


class _Channel:
    """The worker's end of the channel: blocking reads, whole-frame writes."""

    def __init__(self, from_master: int, to_master: int, spin: float = 0.0) -> None:
        self.rfd = from_master
        self.wfd = to_master
        self.spin = spin
        poller = select.poll()
        poller.register(from_master, select.POLLIN)
        self.poll = poller.poll
        os.set_blocking(from_master, True)
        os.set_blocking(to_master, True)
        self.reader = wire.FrameReader(wire.FromMaster)

    def send(self, message: wire.FromWorker) -> None:
        self.write(wire.encode_frame(message))

    def write(self, frame: bytes) -> None:
        # A blocking pipe write completes in one call, unless a signal interrupts it.
        sent = os.write(self.wfd, frame)
        if sent != len(frame):
            view = memoryview(frame)[sent:]
            while view:
                view = view[os.write(self.wfd, view) :]

    def receive(self) -> list[wire.FromMaster | _PartialBatch]:
        """Block for the next message(s); exit the process when the master is gone."""
        if self.spin:
            # Poll a little before sleeping: a caller sending actions one after another
            # gets the next one to us within microseconds, and waking a sleeping process
            # on another CPU costs more than that. Each poll gives way (sched_yield) to a
            # process waiting for this CPU, such as the caller about to read our answer.
            until = time.perf_counter() + self.spin
            poll = self.poll
            while not poll(0) and time.perf_counter() < until:
                os.sched_yield()
        while True:
            n = os.readv(self.rfd, [self.reader.buffer()])
            if not n:
                _exit_lost_master()
            chunk = self.reader.take(n)
            if chunk:
                try:
                    return self.reader.decode(chunk)
                except (wire.ProtocolError, RecursionError):
                    return [_decode_frame(line) for line in chunk.splitlines()]


class _Undecodable:
    """An action of a batch this worker could not decode: it is refused, not run."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _PartialBatch:
    """A batch some of whose actions could not be decoded (see `_decode_frame`)."""

    __slots__ = ("actions",)

    def __init__(self, actions: list[Any]) -> None:
        self.actions = actions


_decode_master = msgspec.json.Decoder(wire.FromMaster).decode
_decode_raw_batch = msgspec.json.Decoder(wire.RawBatch).decode
_decode_value = msgspec.json.Decoder().decode


def _decode_frame(line: bytes) -> wire.FromMaster | _PartialBatch:
    """One frame of a read that did not decode whole: a batch is decoded an action at a
    time, each action that cannot be decoded standing as `_Undecodable`. A frame that does
    not even split into actions leaves the channel in doubt: the worker exits."""
    try:
        return _decode_master(line)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        raw = _decode_raw_batch(line)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise wire.ProtocolError(f"undecodable frame: {exc}") from None
    actions: list[Any] = []
    for item in raw.actions:
        try:
            actions.append(_decode_value(item))
        except (msgspec.DecodeError, RecursionError) as exc:
            actions.append(_Undecodable(f"the worker could not decode the action: {exc}"))
    return _PartialBatch(actions)


def set_process_name(name: str, title: str) -> None:
    """Name this process: `name` in `ps -o comm`, `top` and /proc/PID/stat (15 bytes at
    most), `title` in `ps` and /proc/PID/cmdline (setproctitle)."""
    with contextlib.suppress(Exception):  # a name is a courtesy: never a reason to fail
        import setproctitle

        setproctitle.setproctitle(title)
        setproctitle.setthreadtitle(name[:15])


def _exit_lost_master() -> NoReturn:
    # The master is gone: nobody will read our results, and a clean interpreter exit could
    # run arbitrary handler code (atexit hooks, finalisers). Leave at once.
    os._exit(EXIT_LOST_MASTER)


def arm_lifeline(fd: int) -> None:
    signal.signal(signal.SIGIO, signal.SIG_DFL)
    # The owner is our process group (negative id): grandchildren forked by a handler die too.
    fcntl.fcntl(fd, fcntl.F_SETOWN, -os.getpgrp())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
    # The master may have died before O_ASYNC was set; no SIGIO would come for that.
    readable, _, _ = select.select([fd], [], [], 0)
    if readable:
        _exit_lost_master()


_DONE = b"[12,"
#: Bytes a `Done` frame adds to its result: `[12,` and `]\n`.
_DONE_OVERHEAD = 6
_END: Any = object()


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Runner:
    """Runs batches of actions and reports each outcome before the next action starts."""

    def __init__(self, spec: wire.WorkerSpec, handlers: _Handlers, channel: _Channel) -> None:
        self.handlers = handlers
        self.channel = channel
        self.max_rss = spec.max_rss_bytes
        self.max_result = spec.max_result_bytes
        #: Bytes of answers a batch may write before it is cut (`Cut`); never more than
        #: `max_result`, so that one result too long to send always takes it past.
        self.batch_budget = min(spec.batch_result_bytes, spec.max_result_bytes)
        self.encode = msgspec.json.Encoder().encode
        #: Called after each action while a memory limit applies and was not yet reported.
        self.check_rss: Callable[[], bool] | None = self._check_rss if self.max_rss else None
        #: It sent `Retire`: it runs nothing more and waits to be stopped.
        self.retired = False
        self.reports = _report.Reports(channel.write)

    def _check_rss(self) -> bool:
        """True once the worker is over its memory limit: it has said so and stops here."""
        rss = _rss_bytes()
        if rss <= self.max_rss:
            return False
        # The rest of the batch is not run: the master puts it back on the queue and
        # replaces this worker. Its timings go first: the Retire ends the batch.
        self.channel.write(self.reports.flush(time.perf_counter_ns()))
        self.channel.send(
            wire.Retire(
                f"rss {rss >> 20} MiB over pool.max_worker_rss_mb ({self.max_rss >> 20} MiB)"
            )
        )
        self.retired = True
        return True

    def answer(self, result: Any) -> bytes:
        try:
            return wire.encode_done(self.encode(result))
        except (TypeError, ValueError, OverflowError) as exc:
            return self._unencodable(f"not JSON-compatible: {type(exc).__name__}: {exc}")
        except RecursionError:
            return self._unencodable("it is nested too deeply to encode")
        except MemoryError:
            return self._unencodable("MemoryError: the worker ran out of memory encoding it")

    def over_budget(self, frame: bytes) -> bytes:
        """`frame`, the one that took the batch past its budget: a result too long to send
        becomes `Unencodable` here (the budget never exceeds `max_result_bytes`, so any
        such result lands here)."""
        if len(frame) - _DONE_OVERHEAD > self.max_result and frame.startswith(_DONE):
            return self._unencodable(
                f"it is {len(frame) - _DONE_OVERHEAD} bytes as JSON, over "
                f"pool.max_result_bytes ({self.max_result})"
            )
        return frame

    def _unencodable(self, why: str) -> bytes:
        return wire.encode_frame(wire.Unencodable(_report.cut(why)))

    def split(self, batch: _PartialBatch) -> Iterator[wire.Batch]:
        """A batch with actions that could not be decoded: each of those is refused here,
        each of the others comes out as a batch of its own, to run in order."""
        for action in batch.actions:
            if self.retired:
                return
            if type(action) is _Undecodable:
                self.channel.send(wire.Refused(action.message))
            else:
                yield wire.Batch(0, [action])

    def after_batch(self) -> None:
        # Line buffering already sent whole lines; this pushes out a trailing partial line.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()

    def run_sync(self, batch: wire.Batch) -> None:
        if self.retired:
            return
        write = self.channel.write
        answer = self.answer
        pick = self.handlers.pick
        check_rss = self.check_rss
        budget = self.batch_budget
        counts = self.reports.counts
        clock = time.perf_counter_ns
        reports = self.reports
        actions = iter(batch.actions)
        now = quick = clock()
        reports.start(quick)
        quick += 4000
        fast = 0  # actions in the first bucket (up to 4 us) not yet in `counts`
        for action in actions:
            try:
                result = pick(action)(action)
            except Exception as exc:  # the handler's failure is the action's outcome
                frame = _report.raised(exc)
            else:
                frame = answer(result)
            # Timed here, counted here: one clock read and one comparison an action in
            # bulk (`quick`: 4 us after the previous answer was ready).
            now = clock()
            if now <= quick:
                fast += 1
            else:
                counts[((now - quick + 3999) // 1000).bit_length()] += 1
            quick = now + 4000
            budget -= len(frame)
            if budget < 0:
                counts[0] += fast
                fast = 0
                self.last(frame, actions, now)
                break
            # Timings go with the first answer past `report_at` (every 50 ms at most, or
            # at once when a progress value waits), never a frame of their own.
            if now < reports.report_at:
                write(frame)
            else:
                counts[0] += fast
                fast = 0
                write(reports.flush(now) + frame)
            if check_rss is not None:
                counts[0] += fast
                fast = 0
                if check_rss():
                    break
        counts[0] += fast
        reports.end(now)
        self.after_batch()

    async def run_async(self, batch: wire.Batch) -> None:
        if self.retired:
            return
        budget = self.batch_budget
        reports = self.reports
        clock = time.perf_counter_ns
        actions = iter(batch.actions)
        now = then = clock()
        reports.start(then)
        for action in actions:
            frame = await self._answer_async(action)
            now = clock()
            reports.counts[((now - then - 1) // 1000).bit_length()] += 1
            then = now
            budget -= len(frame)
            if self._written(frame, budget, actions, now):
                break
        reports.end(now)
        self.after_batch()

    async def _answer_async(self, action: Any) -> bytes:
        try:
            result = self.handlers.pick(action)(action)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # the handler's failure is the action's outcome
            return _report.raised(exc)
        return self.answer(result)

    def _written(self, frame: bytes, budget: int, rest: Iterator[Any], now: int) -> bool:
        """Write an action's answer (answered at `now`), with `budget` left after it; True
        if the batch stops here (`run_sync` does the same inline)."""
        if budget < 0:
            self.last(frame, rest, now)
            return True
        if now < self.reports.report_at:
            self.channel.write(frame)
        else:
            self.channel.write(self.reports.flush(now) + frame)
        return self.check_rss is not None and self.check_rss()

    def last(self, frame: bytes, rest: Iterator[Any], now: int) -> None:
        """Write the answer that took the batch past its budget (and the timings up to
        `now` before it), and stop the batch there: the actions left (if any) go back to the
        master (`Cut`), unless the worker is over its memory limit and retires instead."""
        self.channel.write(self.reports.flush(now) + self.over_budget(frame))
        if self.check_rss is None or not self.check_rss():
            self.cut(rest)

    def cut(self, rest: Iterator[Any]) -> None:
        """The batch's results passed its budget: if any of its actions are left, they do
        not start here (`Cut`: the master puts them back in the queue)."""
        if next(rest, _END) is not _END:
            self.channel.send(wire.Cut())


def _serve_sync(runner: _Runner, handlers: _Handlers) -> int:
    try:
        for hook in handlers.hooks("setup"):
            hook()
    except Exception as exc:
        return _start_failed(runner.channel, exc)
    runner.channel.send(wire.Ready(os.getpid()))
    while True:
        for message in runner.channel.receive():
            if isinstance(message, wire.Batch):
                runner.run_sync(message)
            elif isinstance(message, _PartialBatch):
                for one in runner.split(message):
                    runner.run_sync(one)
            else:
                for hook in handlers.hooks("teardown"):
                    hook()
                return 0


async def _serve_async(runner: _Runner, handlers: _Handlers, backend: str) -> int:
    # Between batches the event loop must stay live for the handler's own background tasks,
    # so we wait for the channel through the loop; reading and writing stay plain calls.
    wait_readable = _waiter(backend)
    try:
        for hook in handlers.hooks("setup"):
            if inspect.isawaitable(done := hook()):
                await done
    except Exception as exc:
        return _start_failed(runner.channel, exc)
    runner.channel.send(wire.Ready(os.getpid()))
    rfd = runner.channel.rfd
    while True:
        await wait_readable(rfd)
        for message in runner.channel.receive():
            if isinstance(message, wire.Batch):
                await runner.run_async(message)
            elif isinstance(message, _PartialBatch):
                for one in runner.split(message):
                    await runner.run_async(one)
            else:
                for hook in handlers.hooks("teardown"):
                    if inspect.isawaitable(done := hook()):
                        await done
                return 0


def _start_failed(channel: _Channel, exc: BaseException) -> int:
    channel.send(wire.StartFailed(*_report.describe(exc)))
    return EXIT_START_FAILED


def _waiter(backend: str) -> Callable[[int], Any]:
    if backend == "trio":
        import trio  # only async handlers on trio pay for importing it

        return trio.lowlevel.wait_readable

    import asyncio

    async def wait_readable(fd: int) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    return wait_readable


def _run_async(coro_fn: Callable[[], Any], backend: str) -> int:
    if backend == "trio":
        import trio

        return trio.run(coro_fn)  # type: ignore[no-any-return]
    import asyncio

    return asyncio.run(coro_fn())  # type: ignore[no-any-return]


def serve(spec: wire.WorkerSpec) -> int:
    """Run a worker described by `spec`; returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_process_name("qoper8d-worker", f"qoper8d: worker {spec.slot} {spec.handler}")
    arm_lifeline(spec.lifeline_fd)
    # A fatal signal (SIGSEGV in a C extension) dumps the Python stack to stderr, which the
    # master logs next to the worker's exit event.
    faulthandler.enable()
    extend_path(spec.handler_path)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    channel = _Channel(spec.from_master_fd, spec.to_master_fd, spec.idle_spin)
    try:
        handlers = _Handlers(spec)
    except Exception as exc:
        return _start_failed(channel, exc)
    runner = _Runner(spec, handlers, channel)
    runner.reports.install()
    if handlers.is_async:
        backend = spec.async_backend
        return _run_async(lambda: _serve_async(runner, handlers, backend), backend)
    return _serve_sync(runner, handlers)


def extend_path(dirs: list[str]) -> None:
    for extra in reversed(dirs):
        if extra not in sys.path:
            sys.path.insert(0, extra)


def run_with_spec(
    argv: list[str] | None, spec_type: type[T], serve: Callable[[T], int], program: str
) -> int:
    """`python -m <program> SPEC_JSON`: serve the spec the master handed over (`argv`, or
    the command line's); a usage line and 2 for anything else."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            f"usage: python -m {program} SPEC_JSON  (started by the qoper8d master)",
            file=sys.stderr,
        )
        return 2
    return serve(msgspec.json.decode(args[0], type=spec_type))


def main(argv: list[str] | None = None) -> int:
    return run_with_spec(argv, wire.WorkerSpec, serve, "qoper8d.worker")


if __name__ == "__main__":
    sys.exit(main())
