"""The control socket's file: created safely, held by one daemon, reclaimed, watched.

The socket lives in a directory only its owner may enter: 0700, or 0710 with
`server.socket_group`. An existing directory is checked, not trusted — owned by someone else
or open to others, it stops the start. The socket is bound under a private umask and then
chmod-ed, so it is never, even for an instant, open to others. A lock file held for the
daemon's life makes a second daemon refuse to start whatever the race; a socket left behind
by a dead daemon (nothing listening) is reclaimed; anything else at the path — a symlink
planted there above all — is refused, never followed. inotify tells us if the socket is
deleted while we run, so that it can be bound again.

Whatever makes the path unusable is a `SocketInUse` with one line saying what, never a bare
OSError. `preflight` checks what can be checked before any worker starts (the path's length,
the directory, what is in the way, the lock), so a bad path fails fast; binding checks it all
again, for whatever changed in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import grp
import os
import socket
import stat
import struct
from pathlib import Path

import structlog
import trio

from qoper8d.errors import Qoper8Error

__all__ = [
    "MAX_PATH_BYTES",
    "SocketInUse",
    "bind",
    "group_id",
    "lock",
    "preflight",
    "removed",
    "secure_directory",
    "watch",
]

log = structlog.get_logger("qoper8d.control")


class SocketInUse(Qoper8Error, code="socket_in_use"):
    """Another daemon holds the socket, or something that is not our socket is in the way."""


#: Bytes a Unix socket path can have: `sun_path` holds 108, the last a NUL.
MAX_PATH_BYTES = 107


def _check_length(path: Path) -> None:
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise SocketInUse(
            f"{path} is {size} bytes long, and a Unix socket path holds at most "
            f"{MAX_PATH_BYTES}: choose a shorter server.socket"
        )


def preflight(path: Path, group: int | None) -> None:
    """Check the socket path before anything is started: its length; its directory (created
    if need be); no symlink, nor anything but a socket and our lock file, in the way; and no
    other daemon holding the lock. `bind` and `lock` check again when the time comes."""
    _check_length(path)
    secure_directory(path.parent, group)
    lock_path = Path(f"{path}.lock")
    for name, kind, is_kind in (
        (path, "a socket", stat.S_ISSOCK),
        (lock_path, "a regular file", stat.S_ISREG),
    ):
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SocketInUse(f"cannot look at {name}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise SocketInUse(f"{name} is a symlink; refusing to follow or replace it")
        if not is_kind(info.st_mode):
            raise SocketInUse(f"{name} exists and is not {kind}; refusing to replace it")
    # Released at once: `serve_control` takes it for good once the workers are ready.
    os.close(lock(path))


def secure_directory(directory: Path, group: int | None) -> None:
    """Create the socket's directory (0700, or 0710 with a group) or check an existing one."""
    mode = 0o710 if group is not None else 0o700
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise SocketInUse(f"cannot create {directory}: {directory.parent} does not exist") from None
    except OSError as exc:
        raise SocketInUse(f"cannot create {directory}: {exc.strerror}") from None
    else:
        try:
            os.chmod(directory, mode)  # whatever the umask
            if group is not None:
                os.chown(directory, -1, group)
        except OSError as exc:
            raise SocketInUse(
                f"cannot set the mode or group of {directory}: {exc.strerror}"
            ) from None
        return
    try:
        info = os.lstat(directory)
    except OSError as exc:  # gone again, or a component we may not search
        raise SocketInUse(f"cannot look at {directory}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SocketInUse(f"{directory} is not a directory (a symlink is never followed)")
    if info.st_uid != os.getuid():
        raise SocketInUse(
            f"{directory} belongs to uid {info.st_uid}, not to us ({os.getuid()}): someone "
            "else could replace the socket; choose another server.socket"
        )
    if info.st_mode & 0o007 or (group is None and info.st_mode & 0o070):
        raise SocketInUse(
            f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"make it {mode:o} or choose another server.socket"
        )


def _reclaim(path: Path) -> None:
    """Make room at `path`: remove a stale socket, refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise SocketInUse(f"{path} is a symlink; refusing to follow or replace it")
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.warning("control.stale_socket", socket=str(path))
        path.unlink(missing_ok=True)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise SocketInUse(f"another qoper8d is listening on {path}")


def lock(path: Path) -> int:
    """Hold `<socket>.lock` for our whole life: the one daemon for this socket."""
    name = f"{path}.lock"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # what O_NOFOLLOW says of a symlink
            raise SocketInUse(f"{name} is a symlink; refusing to follow it") from None
        raise SocketInUse(f"cannot open {name}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SocketInUse(f"another qoper8d is running for {path}") from None
    except OSError as exc:
        os.close(fd)
        raise SocketInUse(f"cannot lock {name}: {exc.strerror}") from None
    return fd


def bind(path: Path, group: int | None) -> socket.socket:
    _check_length(path)
    try:
        return _bind(path, group)
    except OSError as exc:
        raise SocketInUse(f"cannot bind {path}: {exc.strerror or exc}") from None


def _bind(path: Path, group: int | None) -> socket.socket:
    _reclaim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # Bind under a private umask so the socket is never, even for an instant, open to
        # others; then set its mode explicitly.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
            bound = True
        finally:
            os.umask(old)
        if group is not None:
            os.chown(path, -1, group)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(512)
    except BaseException:
        sock.close()
        if bound:  # ours, but not as it should be: leave nothing behind
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return sock


def group_id(name: str) -> int | None:
    if not name:
        return None
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise SocketInUse(f"server.socket_group: no group named {name!r}") from None


class _Inotify:
    """Just enough of inotify(7) to learn that the socket was removed or replaced."""

    IN_DELETE = 0x200
    IN_MOVED_FROM = 0x40
    IN_NONBLOCK = os.O_NONBLOCK
    IN_CLOEXEC = os.O_CLOEXEC

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd: int = fd
        if (
            libc.inotify_add_watch(fd, os.fsencode(directory), self.IN_DELETE | self.IN_MOVED_FROM)
            < 0
        ):
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "inotify_add_watch")

    async def removed(self, name: str) -> None:
        """Return once `name` in the watched directory is deleted or moved away."""
        target = os.fsencode(name)
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            offset = 0
            while offset + 16 <= len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                event_name = data[offset + 16 : offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                if event_name == target:
                    return

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


def watch(path: Path) -> _Inotify | None:
    try:
        return _Inotify(path.parent)
    except OSError as exc:  # pragma: no cover - inotify is there on any modern Linux
        log.warning("control.no_inotify", error=str(exc))
        return None


async def removed(watch: _Inotify | None, path: Path, identity: int) -> None:
    """Return when the socket file at `path` is no longer ours (deleted or replaced)."""
    if watch is None:
        await trio.sleep_forever()
    assert watch is not None
    while True:
        await watch.removed(path.name)
        try:
            if os.stat(path).st_ino == identity:
                continue  # something else of that name went; ours is still there
        except FileNotFoundError:
            pass
        return
