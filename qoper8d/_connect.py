"""Reaching the daemon, for both clients: which socket, and what a failed connect means.

Also the few numbers both clients' I/O loops share. What they say once connected is in
`qoper8d._protocol` and `qoper8d._ops`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qoper8d.config import default_socket_path, load_config
from qoper8d.errors import AccessDenied, ConnectError, ConnectTimeout, NotRunning

__all__ = ["SOCKET_ENV", "StrPath", "resolve_socket_path"]

StrPath = str | os.PathLike[str]

#: The environment variable naming the socket when no `socket` is given (empty: unset).
SOCKET_ENV = "QOPER8_SOCKET"

#: Bytes asked of the socket per read; a read carries many responses when they pile up.
RECV_SIZE = 1 << 18
#: Seconds a closing client waits for the daemon to take its last requests (cancels, say)
#: and hang up, before it closes regardless.
CLOSE_GRACE = 2.0


def resolve_socket_path(socket: StrPath | None = None, config: StrPath | None = None) -> Path:
    """The socket to use: `socket` if given, else `$QOPER8_SOCKET`, else the config file's
    `server.socket`, else the default path — the same discovery `qoper8ctl` documents.

    A config file given is read even when the variable wins, so a bad one (or a typo in its
    name) raises `ConfigError` rather than being passed over in silence.
    """
    if socket is not None and os.fspath(socket):
        return Path(socket)
    configured = None if config is None else load_config(config).server.socket_path()
    named = os.environ.get(SOCKET_ENV)
    if named:
        return Path(named)
    return configured if configured is not None else default_socket_path()


def connect_error(exc: OSError, path: Path, timeout: float | None) -> ConnectError:
    """The `ConnectError` for a failed connect(2), with a message a person can act on."""
    where = str(path)
    if isinstance(exc, TimeoutError):
        return timed_out(path, timeout)
    if isinstance(exc, FileNotFoundError):
        return NotRunning(f"no daemon: no socket at {where}", path=where)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"permission denied: {where}", path=where)
    if isinstance(exc, ConnectionRefusedError):
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            is_socket = True
        if not is_socket:
            return NotRunning(f"no daemon: {where} is not a socket", path=where)
        return NotRunning(f"no daemon: nothing listening on {where} (stale socket)", path=where)
    return ConnectError(f"cannot connect to {where}: {exc.strerror or exc}", path=where)


def timed_out(path: Path, timeout: float | None) -> ConnectTimeout:
    return ConnectTimeout(f"timed out after {timeout:g} s talking to {path}", path=str(path))
