"""What both clients share: request lines, response decoding, errors, finding the socket.

See `qoper8d.client` for how the clients behave; this is their common vocabulary of
docs/protocol.md.
"""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import msgspec

from qoper8d.config import default_socket_path, load_config
from qoper8d.errors import (
    AccessDenied,
    ConnectError,
    ConnectTimeout,
    NotRunning,
    Qoper8Error,
    error_from_wire,
)

__all__ = ["RequestId", "StrPath", "resolve_socket_path"]

RequestId = int | str
StrPath = str | os.PathLike[str]

#: Bytes asked of the socket per read; a read carries many responses when they pile up.
_RECV_SIZE = 1 << 18
#: Buffers per sendmsg(2), under Linux's IOV_MAX of 1024.
_MAX_IOV = 512
#: Seconds a closing client waits for the daemon to take its last requests (cancels, say)
#: and hang up, before it closes regardless.
_CLOSE_GRACE = 2.0


class _Response(msgspec.Struct):
    id: RequestId | None = None
    ok: bool = False
    result: Any = None
    error: dict[str, Any] | None = None


_decode_responses = msgspec.json.Decoder(_Response).decode_lines
_encode = msgspec.json.Encoder().encode


def resolve_socket_path(socket: StrPath | None = None, config: StrPath | None = None) -> Path:
    """The socket to use: `socket` if given, else the config file's `server.socket`, else
    the default path — the same discovery `qoper8ctl` documents. A bad config file raises
    `ConfigError`."""
    if socket is not None and os.fspath(socket):
        return Path(socket)
    if config is not None:
        return load_config(config).server.socket_path()
    return default_socket_path()


def _connect_error(exc: OSError, path: Path, timeout: float | None) -> ConnectError:
    """The `ConnectError` for a failed connect(2), with a message a person can act on."""
    where = str(path)
    if isinstance(exc, TimeoutError):
        return _timed_out(path, timeout)
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


def _timed_out(path: Path, timeout: float | None) -> ConnectTimeout:
    return ConnectTimeout(f"timed out after {timeout:g} s talking to {path}", path=str(path))


def _hung_up(path: Path) -> NotRunning:
    return NotRunning(
        f"the daemon at {path} closed the connection before answering "
        "(it stopped, or is restarting)",
        path=str(path),
    )


def _unreadable(path: Path, exc: Exception) -> ConnectError:
    return ConnectError(f"unreadable response from {path}: {exc}", path=str(path))


def _request_line(rid: RequestId, op: str, params: dict[str, Any]) -> bytes:
    return _encode({"id": rid, "op": op, **params}) + b"\n"


def _submit_fields(timeout: float | None, max_attempts: int | None) -> bytes:
    """The optional submit fields, encoded once and spliced into every submit line."""
    fields = b""
    if timeout is not None:
        fields += b',"timeout":' + _encode(float(timeout))
    if max_attempts is not None:
        fields += b',"max_attempts":' + _encode(int(max_attempts))
    return fields


def _submit_line(rid: int, fields: bytes, action: Any) -> bytes:
    return b'{"id":%d,"op":"submit"%b,"action":%b}\n' % (rid, fields, _encode(action))


def _cancel_line(rid: int, target: RequestId) -> bytes:
    return _request_line(rid, "cancel", {"target": target})


def _outcome(response: _Response) -> Any:
    if response.ok:
        return response.result
    raise _error(response)


def _error(response: _Response) -> Qoper8Error:
    return error_from_wire(response.error or {"code": "error", "message": "no error given"})


class _LineDecoder:
    """Sans-IO: bytes from the daemon in, decoded responses out.

    An error line with id null is the daemon's reason for closing the connection (say
    `forbidden`); it is kept in `fatal` to be raised once the connection ends.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buf = bytearray()
        self.fatal: Qoper8Error | None = None

    def feed(self, data: bytes) -> list[_Response]:
        """The responses completed by `data`; `ConnectError` if they are not JSON."""
        # Only `data` is searched for a newline, so a long line arriving in many reads is
        # scanned once, not once per read.
        end = data.rfind(b"\n")
        if end < 0:
            self.buf += data
            return []
        chunk = data[: end + 1]
        if self.buf:
            chunk = bytes(self.buf) + chunk
            self.buf.clear()
        self.buf += data[end + 1 :]
        try:
            responses = _decode_responses(chunk)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _unreadable(self.path, exc) from None
        for response in responses:
            if response.id is None:
                self.fatal = _error(response)
        return responses

    def ended(self) -> Qoper8Error:
        """Why the connection ended: the daemon's last word, or a plain hang-up."""
        return self.fatal or _hung_up(self.path)


def _again(error: Qoper8Error) -> Qoper8Error:
    """A copy of a connection's failure to raise: every request waiting on the connection
    raises it, and one exception object raised in many places would share a traceback."""
    fresh = copy.copy(error)
    fresh.__dict__.update(error.__dict__)  # an unknown code lives on the instance
    return fresh


def _check_window(window: int) -> None:
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window!r}")
