"""A real redis-server for the cluster tests, on a private Unix socket in a temp dir.

One server for the whole session (`redis_session`: each test takes a stream of its own on
it, so tests never see each other's entries), and `redis_own` for a test that kills or
restarts its server. The server tells us it is ready as it tells systemd (READY=1 on a
NOTIFY_SOCKET), so nothing waits on a sleep. AOF is on: a server killed and started again
on the same directory has every write it acknowledged.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["RedisServer", "cluster_section", "redis_own", "redis_session"]


class RedisServer:
    """A redis-server process on `directory/redis.sock`; `start()` again after `kill()`."""

    def __init__(
        self, directory: Path, *, fsync_always: bool = False, extra: tuple[str, ...] = ()
    ) -> None:
        """`extra`: more of redis-server's arguments (`--rename-command X Y`, say)."""
        if shutil.which("redis-server") is None:  # pragma: no cover - `make test` installs it
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.dir = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.fsync = "always" if fsync_always else "everysec"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def arguments(self) -> list[str]:
        pairs = {
            "port": "0",  # no TCP at all: nothing outside this test can reach it
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "dir": str(self.dir),
            "appendonly": "yes",
            "appendfsync": self.fsync,
            "save": "",
            "supervised": "systemd",
            "daemonize": "no",
            "logfile": str(self.dir / "redis.log"),
        }
        words = [word for key, value in pairs.items() for word in (f"--{key}", value)]
        return [*words, *self.extra]

    def start(self, timeout: float = 10.0) -> None:
        notify_path = self.dir / "redis.notify"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(timeout)
            self.proc = subprocess.Popen(
                ["redis-server", *self.arguments()],
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = notify.recv(4096).decode()
                if "READY=1" in message.split("\n"):
                    return
            raise AssertionError("redis-server did not become ready")  # pragma: no cover

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def cli(self, *args: str) -> str:
        """A redis-cli command's output, for looking at keys from outside the daemon."""
        out = subprocess.run(
            ["redis-cli", "-s", str(self.socket), *args],
            check=True,
            capture_output=True,
            timeout=10,
        )
        return out.stdout.decode().strip()


def _short_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="q8r-", dir="/tmp"))
    os.chmod(path, 0o700)
    return path


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    server = RedisServer(_short_dir())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_own() -> Iterator[RedisServer]:
    server = RedisServer(_short_dir(), fsync_always=True)
    try:
        yield server
    finally:
        server.close()


def cluster_section(server: RedisServer, stream: str | None = None, **keys: Any) -> dict[str, Any]:
    """A `[cluster]` section on `server`, on a stream no other test uses."""
    return {
        "backend": "redis",
        "url": server.url,
        "stream": stream or f"t{uuid.uuid4().hex[:12]}",
        "prefetch": 0,
        **keys,
    }
