"""A real qoper8d for tests: started as a process, synchronised on events, never on sleeps.

`start_daemon(tmp, config)` writes the configuration, starts `python -m qoper8d`, and
returns once the daemon says READY=1 on a NOTIFY_SOCKET (the systemd readiness protocol it
speaks anyway). Its stderr (JSON log lines) is collected by a thread, so a test can wait for a
given event. `stop()` sends SIGTERM and requires a clean exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent

Event = dict[str, Any]

#: The fields of `status --json` and of each `pool.snapshot` log event.
SNAPSHOT_FIELDS = {
    "state",
    "size",
    "busy",
    "idle",
    "queued",
    "queued_bytes",
    "in_flight",
    "submitted",
    "outcomes",
    "restarts",
    "uptime",
    "workers",
    "durations",
    "recent_exits",
    "daemon",
    "cluster",
}


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory in MiB (`field="VmHWM"`: the most it ever had)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def base_config(tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A test configuration: a socket in `tmp`, JSON logs, a small pool; `sections` on top."""
    config: dict[str, Any] = {
        "pool": {"size": 2, "handler": "handlers.crash:handle", "grace_period": 5.0},
        "supervisor": {"max_restarts": 100, "backoff_initial": 0.0},
        "server": {"socket": str(tmp / "q.sock")},
        "monitor": {"log_format": "json", "interval": 3600.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


class Daemon:
    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        *,
        ready: bool = True,
        preexec_fn: Callable[[], None] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        """Start the daemon (`args` after `--config`); `preexec_fn` runs in the child before
        it starts Python, to lower a resource limit, say."""
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "qoper8.toml"
        self.config_path.write_text(tomli_w.dumps(config))
        self.socket = Path(config["server"]["socket"])
        self.events: list[Event] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()
        notify_path = tmp / "notify"
        notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qoper8d", "--config", str(self.config_path), *args],
            cwd=ROOT,
            env=env,
            preexec_fn=preexec_fn,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        if ready:
            self.wait_ready()

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                self.lines.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until READY=1 arrives on the notify socket, or the daemon exits first."""
        self._notify.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self._notify.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"the daemon exited ({self.proc.returncode}) before it was ready:\n"
                        + "\n".join(self.lines[-20:])
                    ) from None
                continue
            if "READY=1" in message.split("\n"):
                return
        raise AssertionError("the daemon did not become ready in time")

    def wait_event(
        self, name: str, where: Callable[[Event], bool] = lambda e: True, timeout: float = 20
    ) -> Event:
        """The first log event called `name` matching `where`, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events:
                    if event.get("event") == name and where(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {name} event; last lines:\n" + "\n".join(self.lines[-15:])
                    )
                self._changed.wait(left)

    def wait_count(self, name: str, count: int, timeout: float = 20) -> list[Event]:
        """Once `count` log events called `name` have been logged: all of them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(found := [e for e in self.events if e.get("event") == name]) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{len(found)} of {count} {name} events; last lines:\n"
                        + "\n".join(self.lines[-15:])
                    )
                self._changed.wait(left)
            return found

    def of(self, name: str) -> list[Event]:
        with self._changed:
            return [e for e in self.events if e.get("event") == name]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            last = "\n".join(self.lines[-25:])
            raise AssertionError(f"the daemon did not exit within {timeout} s:\n{last}") from None
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    def close(self) -> None:
        self.kill()
        self._notify.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextmanager
def running_daemon(tmp: Path, **sections: dict[str, Any]) -> Iterator[Daemon]:
    """A daemon for the block; it must stop cleanly (exit 0) on SIGTERM at the end."""
    daemon = Daemon(tmp, base_config(tmp, **sections))
    try:
        yield daemon
        if daemon.proc.poll() is None:
            assert daemon.stop() == 0, "\n".join(daemon.lines[-20:])
    finally:
        daemon.close()


class Connection:
    """A raw NDJSON connection to the daemon: send lines, read responses by id."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")

    def send(self, *requests: dict[str, Any] | bytes) -> None:
        data = b"".join(
            r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in requests
        )
        self.sock.sendall(data)

    def receive(self) -> dict[str, Any] | None:
        line = self._file.readline()
        return json.loads(line) if line else None

    def receive_all(self, count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _ in range(count):
            response = self.receive()
            assert response is not None, f"connection closed after {len(out)} responses"
            out.append(response)
        return out

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        response = self.receive()
        assert response is not None
        return response

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
