"""The qoper8d service: a pool, its control socket, snapshots and signals, in one trio run.

Start-up order is the contract: logging, then every worker ready, then the socket bound —
so a client that can connect can be served. The socket path is checked before the first
worker starts, though (its length, its directory, what is in the way, the lock), so a path
that cannot work fails the start at once, not after every worker was started for nothing.
Then `daemon.started` (the banner, unless `monitor.silent_start`) and, under systemd
(`NOTIFY_SOCKET`), READY=1, then a watchdog ping every half `WATCHDOG_USEC` while the pool's
nursery answers (see `_systemd`). A control socket systemd hands over (`LISTEN_FDS`) is used
as it is, and nothing about `server.socket` is checked then.

Stopping: SIGTERM, SIGINT, the `shutdown` op or the end of a `drain` closes intake (new
submissions end `shutting_down`), lets running and queued work finish for
`pool.grace_period`, ends what is left `shutting_down`, stops the workers, and writes every
response still owed to a client before the socket closes. A second SIGTERM or SIGINT cuts
the grace period short. SIGHUP reloads the configuration file, like the `reload` op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio

from qoper8d._fds import ensure_fd_limit, open_fd_count
from qoper8d._socketfile import group_id, preflight
from qoper8d._systemd import Notifier, listen_socket, serve_watchdog, socket_name, status_line
from qoper8d._version import __version__
from qoper8d.config import Config, Overrides, apply_overrides, changes, load_config
from qoper8d.control import ControlServer, serve_control
from qoper8d.errors import Qoper8Error, single_error
from qoper8d.monitor import LogWriter, serve_snapshots, set_level
from qoper8d.pool import Pool, open_pool

if TYPE_CHECKING:
    from qoper8d._http import HttpServer
    from qoper8d._node import Node

__all__ = ["Daemon", "config_changes"]

log = structlog.get_logger("qoper8d.daemon")


def config_changes(old: Config, new: Config) -> list[str]:
    """Every key whose value differs, as `section.key: old -> new`."""
    return [line for name in Config.__struct_fields__ for line in _section_changes(old, new, name)]


def _section_changes(old: Config, new: Config, name: str) -> list[str]:
    return changes(getattr(old, name), getattr(new, name), name)


def _set_title(title: str) -> None:
    """What `ps` shows for this process."""
    import setproctitle

    setproctitle.setproctitle(title)


def _bind_http(config: Config) -> socket.socket:
    # Imported only when asked for: hypercorn and prometheus-client are the http extra.
    from qoper8d._http import bind_http

    return bind_http(config.http)


@asynccontextmanager
async def _cluster_link(cfg: Config) -> AsyncIterator[Any]:
    """With `[cluster] backend = "redis"`: the connection to Redis, made before any worker
    starts (`Unavailable`, exit 7, if it cannot be). Otherwise None, and nothing imported."""
    if cfg.cluster.backend == "none":
        yield None
        return
    from qoper8d._link import open_link
    from qoper8d._node import node_name

    async with open_link(cfg.cluster, node_name(cfg.cluster)) as link:
        yield link


class Daemon:
    """Runs the service until it is told to stop. `run()` raises what prevents a start:
    `WorkerStartError`, `SocketInUse`; and `RestartIntensityExceeded` if the pool fails."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        logs: LogWriter,
        overrides: Overrides | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        #: The command line's keys: they beat the file at the start and at every reload.
        self.overrides: Overrides = overrides or {}
        self._logs = logs
        self._pool: Pool | None = None
        self._control: ControlServer | None = None
        self._http: HttpServer | None = None
        self._node: Node | None = None
        self._stop = trio.Event()
        self._grace: float | None = None
        self._graceful: trio.CancelScope | None = None
        self._reloading = trio.Lock()
        # systemd's hand-over first, before anything opens a descriptor that could take fd 3
        # had systemd passed none; both take their variables out of the environment.
        self._listener = listen_socket()
        self._systemd = Notifier.from_environ()
        #: The control socket's path, as `status` reports it.
        self.socket = (
            socket_name(self._listener) if self._listener else str(config.server.socket_path())
        )

    # -- the control hooks -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self._pool is not None
        snapshot: dict[str, Any] = msgspec.to_builtins(self._pool.statistics())
        snapshot["daemon"] = self._numbers() | {
            "pid": os.getpid(),
            "version": __version__,
            "socket": self.socket,
            "config": str(self.config_path) if self.config_path else None,
            "open_fds": open_fd_count(),  # even with none left to count them with
            # Where the operators' listener is (its port, when `http.listen` asked for 0).
            "http": self._http.url if self._http else None,
        }
        snapshot["cluster"] = self._node.status() if self._node else {"backend": "none"}
        return snapshot

    def _numbers(self) -> dict[str, int]:
        """Leak indicators an operator (and the fault tests) can watch over time."""
        return {
            "connections": len(self._control.connections) if self._control else 0,
            "unsent_bytes": self._control.unsent_bytes() if self._control else 0,
            "tasks": trio.lowlevel.current_statistics().tasks_living,
        } | (self._http.numbers() if self._http else {})

    async def scale(self, size: int) -> int:
        assert self._pool is not None
        # The descriptors the new workers need, or a refusal naming the limit (ConfigError).
        ensure_fd_limit(size, self.config.server.max_connections + self.config.http.connections())
        reached = await self._pool.scale(size)
        log.info("daemon.scaled", size=reached)
        return reached

    def size(self) -> int:
        assert self._pool is not None
        return self._pool.size

    async def reload(self, via: str = "socket") -> list[str]:
        """Re-read the configuration file, apply the command line's overrides on top again,
        and apply the result; the changes, one line each. Every outcome is logged, changed
        or not (`daemon.reloaded`, `changes` empty when nothing changed), failed or not
        (`daemon.reload_failed`), with `via`: what asked for it.

        The pool compares the result with what it runs (a `scale` since the start included,
        so a reload undoes a scale the file and the flags do not agree with) and applies the
        difference by replacing workers one at a time, its turn taken among resizes.
        `server.*` and `monitor.log_format` need a restart; `monitor.log_level` applies at
        once. An invalid file raises `ConfigError` and changes nothing.
        """
        assert self._pool is not None
        try:
            notes = await self._reload()
        except Qoper8Error as exc:
            errors = exc.details.get("errors", [exc.message])
            log.error("daemon.reload_failed", via=via, errors=errors)
            raise
        if self.config_path is None:
            log.info("daemon.reloaded", via=via, changes=[], config=None)
        else:
            log.info("daemon.reloaded", via=via, changes=notes, config=str(self.config_path))
        return notes

    async def _reload(self) -> list[str]:
        assert self._pool is not None
        if self.config_path is None:
            return []  # started from the defaults and flags: nothing to re-read
        async with self._reloading, self._told_reloading():
            new = apply_overrides(
                load_config(self.config_path),
                self.overrides,
                f"{self.config_path} + command line",
            )
            ensure_fd_limit(
                new.pool.size, self.config.server.max_connections + self.config.http.connections()
            )
            applied = await self._pool.reconfigure(new.pool, new.supervisor)
            old = self.config
            # What the running daemon cannot take on is kept as it is, and reported each time.
            kept = msgspec.structs.replace(new.monitor, log_format=old.monitor.log_format)
            restart = [
                change for name in ("server", "http") for change in _section_changes(old, new, name)
            ] + [
                change
                for change in changes(old.monitor, new.monitor, "monitor")
                if change.startswith("monitor.log_format:")
            ]
            later = [f"{change} (takes effect after a restart)" for change in restart]
            notes = applied + later + changes(old.monitor, kept, "monitor")
            if kept.log_level != old.monitor.log_level:
                set_level(kept.log_level)
            self.config = msgspec.structs.replace(
                new, server=old.server, http=old.http, monitor=kept, pool=self._pool.config
            )
            return notes

    @asynccontextmanager
    async def _told_reloading(self) -> AsyncIterator[None]:
        """RELOADING=1 for systemd while a reload runs; READY=1 once it is over, applied or
        refused (the daemon serves on either way)."""
        assert self._pool is not None
        self._systemd.reloading()
        try:
            yield
        finally:
            self._systemd.ready(status_line(self._pool.statistics()))

    async def drain(self) -> None:
        assert self._pool is not None
        log.info("daemon.draining")
        await self._pool.drain()

    def shutdown(self, grace: float | None) -> None:
        if self._stop.is_set():
            # Asked again while stopping: stop now.
            if self._graceful is not None:
                self._graceful.cancel()
            return
        self._grace = grace
        self._stop.set()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except BaseExceptionGroup as group:
            raise single_error(group) from None
        finally:
            self._systemd.close()

    async def _run(self) -> None:
        async with trio.open_nursery() as background:
            background.start_soon(self._logs.serve)
            # Signals are ours from the start: a SIGTERM while workers start stops cleanly.
            background.start_soon(self._signals, background)
            try:
                await self._serve()
            finally:
                background.cancel_scope.cancel()

    async def _serve(self) -> None:
        cfg = self.config
        _set_title(f"qoper8d: master {self.socket}")
        if self._listener is None:
            preflight(cfg.server.socket_path(), group_id(cfg.server.socket_group))
        else:  # systemd's: server.socket only says where qoper8ctl --config looks
            log.info("daemon.socket_inherited", socket=self.socket, fd=self._listener.fileno())
        self._systemd.notify(status=f"starting {cfg.pool.size} workers")
        # Bound before any worker starts, like the socket's checks: a taken port fails fast.
        http_socket = _bind_http(cfg) if cfg.http.listen else None
        try:
            await self._serve_pool(cfg, http_socket)
        finally:
            if http_socket is not None:
                http_socket.close()

    async def _serve_pool(self, cfg: Config, http_socket: socket.socket | None) -> None:
        async with (
            _cluster_link(cfg) as link,
            open_pool(config=cfg.pool, supervisor=cfg.supervisor) as pool,
        ):
            self._pool = pool
            async with trio.open_nursery() as nursery:
                if link is not None:
                    from qoper8d._node import Node

                    self._node = Node(link, pool, cfg.cluster)
                    await nursery.start(self._node.serve)
                serve = partial(serve_control, inherited=self._listener)
                self._control = await nursery.start(serve, pool, self, cfg.server, self._node)
                if http_socket is not None:
                    self._http = await nursery.start(self._serve_http, http_socket)
                nursery.start_soon(
                    serve_snapshots, self.status, lambda: self.config.monitor.interval
                )
                if not cfg.monitor.silent_start:
                    self._banner()
                self._systemd_ready(pool, nursery)
                await self._stop.wait()
                await self._stop_gracefully(pool)
                nursery.cancel_scope.cancel()

    def _systemd_ready(self, pool: Pool, nursery: trio.Nursery) -> None:
        """READY=1 (the socket accepts work now), then the watchdog and STATUS= updates."""
        if not self._systemd.enabled:
            return
        self._systemd.ready(status_line(pool.statistics()))

        def status() -> str:
            if self._reloading.locked():
                return "reloading the configuration"
            return status_line(pool.statistics())

        nursery.start_soon(serve_watchdog, self._systemd, pool.heartbeat, status)

    async def _serve_http(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[HttpServer]
    ) -> None:
        from qoper8d._http import HttpServer, serve_http

        assert self._pool is not None
        server = HttpServer(self.config.http, self.status, self._pool.statistics, self._numbers)
        await serve_http(server, sock, task_status=task_status)

    async def _stop_gracefully(self, pool: Pool) -> None:
        grace = self.config.pool.grace_period if self._grace is None else self._grace
        log.info("daemon.stopping", grace_period=grace)
        self._systemd.stopping(f"stopping: {grace:g} s for the work accepted to finish")
        if self._control is not None:
            self._control.refuse_changes()
        node = self._node
        if node is not None:
            node.stop_taking()
        with trio.move_on_after(grace) as self._graceful:
            await pool.drain()
            if node is not None:
                await node.drained()
        await pool.stop(0)
        if node is not None:
            with trio.move_on_after(5):  # what the pool cut short: replies, entries put back
                await node.drained(tickets=False)
            node.submits.give_up()
        # Every accepted action has its outcome now; make sure its client hears it.
        if self._control is not None:
            with trio.move_on_after(5):
                await self._control.flushed()
        log.info("daemon.stopped", outcomes=pool.statistics().outcomes)

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("daemon.signal", signal=name, action="reload")
                    nursery.start_soon(self._reload_logged)
                else:
                    now = "stop now" if self._stop.is_set() else "graceful stop"
                    log.info("daemon.signal", signal=name, action=now)
                    self.shutdown(None)

    async def _reload_logged(self) -> None:
        with contextlib.suppress(Qoper8Error):  # reload() logged it
            await self.reload(via="SIGHUP")

    def _banner(self) -> None:
        cfg = self.config
        log.info(
            "daemon.started",
            version=__version__,
            pid=os.getpid(),
            socket=self.socket,
            config=str(self.config_path) if self.config_path else None,
            size=cfg.pool.size,
            handler=cfg.pool.handler,
            start_method=cfg.pool.start_method,
            max_batch_bytes=cfg.pool.max_batch_bytes,
            monitor_interval=cfg.monitor.interval,
        )
