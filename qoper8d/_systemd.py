"""systemd: readiness and status (sd_notify), the watchdog, and the socket it hands over.

The daemon reads what systemd hands it once, at start, and takes it out of the environment
(as `sd_listen_fds(1)` and `sd_watchdog_enabled(1)` do), so nothing it starts can act on it.
Every worker launcher strips the same variables again (`SYSTEMD_VARIABLES`), for `open_pool`
programs run by systemd too: a worker that sent READY=1 or pinged the watchdog would vouch
for a master it knows nothing of, and one that took LISTEN_FDS would take the control socket.

* Notifications are datagrams on `NOTIFY_SOCKET` (a path, or `@` for the abstract
  namespace), sent without blocking from one socket opened at start, so neither a busy
  systemd nor a daemon out of descriptors can stall the master or silence its watchdog.
* The watchdog (`WATCHDOG_USEC`, for us unless `WATCHDOG_PID` names another process) is
  pinged every half period by `serve_watchdog`, and each ping is earned: before it, a fresh
  task in the pool's own nursery — where supervision runs — must have been scheduled and
  answered (`Pool.heartbeat`). A master whose event loop is stuck, or whose pool nursery is
  gone, stops pinging and systemd restarts it; a crashing handler, a restarting worker, a
  degraded pool or a full queue change nothing about that, so they never get it killed.
* Socket activation: with `LISTEN_PID` our pid and `LISTEN_FDS` >= 1, descriptor 3 is the
  control socket. It must be a listening AF_UNIX stream socket; it is then used as it is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable, MutableMapping

import structlog
import trio

from qoper8d._socketfile import SocketInUse
from qoper8d.stats import PoolStatistics

__all__ = [
    "LISTEN_FDS_START",
    "STATUS_INTERVAL",
    "SYSTEMD_VARIABLES",
    "Notifier",
    "listen_socket",
    "serve_watchdog",
    "socket_name",
    "status_line",
]

log = structlog.get_logger("qoper8d.daemon")

#: What systemd hands its main process alone; no worker or fork server ever inherits them.
SYSTEMD_VARIABLES = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
)
#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: Seconds between STATUS= updates when no watchdog asks for pings more often.
STATUS_INTERVAL = 10.0
#: Bytes of a STATUS= text: enough for a line `systemctl status` shows, never a big datagram.
MAX_STATUS_BYTES = 200


class Notifier:
    """Our end of `NOTIFY_SOCKET`: `notify()` is a no-op when nobody listens."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        #: Seconds systemd allows between two WATCHDOG=1 pings (None: no watchdog).
        self.watchdog = watchdog
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        self._shown: str | None = None
        if not address:
            return
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif not address.startswith("/"):  # vsock:..., say: not for a local daemon
            log.warning("systemd.notify_unsupported", notify_socket=address)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=os.strerror(exc.errno or 0))
            return
        sock.setblocking(False)
        self._address, self._sock = address, sock

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, and take them out of
        `environ` (`os.environ`)."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        usec, pid = env.pop("WATCHDOG_USEC", None), env.pop("WATCHDOG_PID", None)
        watchdog = None
        if usec is not None and (pid is None or pid == str(os.getpid())):
            try:
                watchdog = int(usec) / 1e6
            except ValueError:
                watchdog = 0.0
            if not watchdog > 0:
                log.warning("systemd.watchdog_ignored", watchdog_usec=usec)
                watchdog = None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str, status: str | None = None) -> bool:
        """Send `KEY=value` fields in one datagram, with `STATUS=status` if that is news;
        whether it went. Never blocks: a failure is logged once per streak, and the message
        dropped."""
        if self._sock is None or self._address is None:
            return False
        if status is not None and (line := _status(status)) != self._shown:
            fields = (*fields, line)
            self._shown = line
        if not fields:
            return True
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("systemd.notify_failed", error=os.strerror(exc.errno or 0))
            return False
        if self._failing:
            self._failing = False
            log.info("systemd.notify_resumed")
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"MAINPID={os.getpid()}", status=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (it needs it for
        # Type=notify-reload); READY=1 follows once the reload is done or has failed.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", status="reloading the configuration")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    """A STATUS= field: one line, bounded."""
    line = " ".join(text.split())
    raw = line.encode()
    if len(raw) > MAX_STATUS_BYTES:
        line = raw[: MAX_STATUS_BYTES - 3].decode(errors="ignore") + "..."
    return f"STATUS={line}"


def status_line(stats: PoolStatistics) -> str:
    """The pool in a few words, for `systemctl status`."""
    serving = [w for w in stats.workers if w.pid is not None and w.state in ("idle", "busy")]
    work = f"{stats.busy} busy, {stats.queued} queued, {stats.restarts} restarts"
    if stats.state != "running":
        return f"{stats.state}: {len(serving)} of {stats.size} workers serving; {work}"
    if len(serving) < len(stats.workers):
        others = [f"slot {w.slot} {w.state}" for w in stats.workers if w not in serving]
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"degraded: {len(serving)} of {stats.size} workers serving ({shown}); {work}"
    return f"serving: {stats.size} workers; {work}"


async def serve_watchdog(
    notifier: Notifier,
    heartbeat: Callable[[Callable[[], object]], None],
    status: Callable[[], str],
) -> None:
    """Ping the watchdog every half period, each ping only once `heartbeat` has answered;
    update STATUS= as it changes. Returns when the pool is gone (`heartbeat` raises
    RuntimeError): from then on the watchdog goes unfed, and systemd acts."""
    period = STATUS_INTERVAL if notifier.watchdog is None else notifier.watchdog / 2
    while True:
        due = trio.current_time() + period
        fields = []
        if notifier.watchdog is not None:
            beat = trio.Event()
            try:
                heartbeat(beat.set)
            except RuntimeError:
                log.warning("systemd.watchdog_stopped", reason="the pool is gone")
                return
            # No deadline of our own: an answer that never comes means no more pings,
            # which is what systemd's watchdog is there to notice.
            await beat.wait()
            fields.append("WATCHDOG=1")
        notifier.notify(*fields, status=status())
        await trio.sleep_until(due)


def listen_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The control socket systemd passed (LISTEN_FDS), or None; the variables are taken out
    of `environ` (`os.environ`) either way. Raises `SocketInUse` when what was passed is not
    a listening AF_UNIX stream socket. Further descriptors, if any, are left alone (closed
    on exec): one socket is all the daemon serves."""
    env = os.environ if environ is None else environ
    pid, fds = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    names = env.pop("LISTEN_FDNAMES", "")
    if pid is None or fds is None or pid != str(os.getpid()):
        return None  # none, or meant for another process
    try:
        count = int(fds)
    except ValueError:
        raise SocketInUse(f"LISTEN_FDS={fds!r} is not a number of descriptors") from None
    if count < 1:
        return None
    fd = LISTEN_FDS_START
    if count > 1:
        log.warning("systemd.sockets_ignored", count=count - 1, names=names[:200], served="fd 3")
        for extra in range(fd + 1, fd + min(count, 64)):  # bounded: a bogus count is no loop
            with contextlib.suppress(OSError):  # FD_CLOEXEC, as sd_listen_fds() sets it
                os.set_inheritable(extra, False)
    why = _not_a_listener(fd)
    if why is not None:
        raise SocketInUse(
            f"fd {fd} from systemd (LISTEN_FDS) {why}; the control socket must be a "
            "listening AF_UNIX stream socket (ListenStream=, Accept=no)"
        )
    os.set_inheritable(fd, False)  # FD_CLOEXEC: no child gets a copy
    return socket.socket(fileno=fd)


def _not_a_listener(fd: int) -> str | None:
    """What is wrong with `fd` as a control socket, or None."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        return f"cannot be used: {os.strerror(exc.errno or 0)}"
    if not stat.S_ISSOCK(mode):
        kinds = {stat.S_ISREG: "a regular file", stat.S_ISDIR: "a directory"}
        kinds.update({stat.S_ISFIFO: "a pipe", stat.S_ISCHR: "a character device"})
        kind = next((name for test, name in kinds.items() if test(mode)), "not a socket")
        return f"is {kind}"
    # Asked of the descriptor itself: no socket object, which would own (and close) it.
    probe = socket.socket(fileno=os.dup(fd))
    try:
        if probe.family != socket.AF_UNIX:
            return f"is a {_name(probe.family)} socket"
        if probe.type != socket.SOCK_STREAM:
            return f"is a {_name(probe.type)} socket (ListenStream= makes a stream socket)"
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "is not listening (Accept=yes hands over connections, not the socket)"
    finally:
        probe.close()
    return None


def _name(constant: int) -> str:
    """An address family's or socket type's name (AF_INET), or its number."""
    name = getattr(constant, "name", None)
    return name if isinstance(name, str) else str(int(constant))


def socket_name(sock: socket.socket) -> str:
    """The path a Unix socket is bound to (`@name` in the abstract namespace)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="backslashreplace") if name else "<unnamed>"
    return str(name) or "<unnamed>"
