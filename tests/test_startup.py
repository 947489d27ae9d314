"""Start-up failures: the right exit code and one line that says what is wrong, every time.

No traceback, no exception group: whatever stops the start is one log event, and a bad
socket path is found before a single worker is started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qoper8d._socketfile import SocketInUse, bind, lock, secure_directory
from qoper8d.cli import EXIT_SOCKET, EXIT_WORKERS
from tests.harness import Daemon, base_config


def failed_start(tmp: Path, config: dict[str, object]) -> Daemon:
    """Start a daemon that must not become ready; return it once it has exited."""
    daemon = Daemon(tmp, config, ready=False)
    daemon.wait()
    return daemon


def assert_one_error_line(daemon: Daemon, event: str) -> dict[str, object]:
    """Every line of stderr is a JSON event, no traceback among them, and exactly one is an
    error: `event`. Returns that event."""
    text = "\n".join(daemon.lines)
    for line in daemon.lines:
        json.loads(line)  # nothing but log events: a traceback would not parse
    errors = [e for e in daemon.events if e.get("level") in ("error", "critical")]
    assert [e["event"] for e in errors] == [event], text
    return errors[0]


@pytest.mark.parametrize("size", [1, 3])
def test_a_setup_that_hangs_exits_workers_with_one_line(short_tmp: Path, size: int) -> None:
    pool = {"size": size, "handler": "handlers.hang_setup:handle", "start_timeout": 0.5}
    config = base_config(short_tmp, pool=pool)
    daemon = failed_start(short_tmp, config)
    try:
        assert daemon.proc.returncode == EXIT_WORKERS, "\n".join(daemon.lines)
        failed = assert_one_error_line(daemon, "daemon.workers_failed")
        assert "did not report ready within 0.5 s" in str(failed["error"])
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        ("handlers.broken_setup:handle", "setup failed on purpose"),
        # Each worker exits on its own, each slot's error names its slot: whether one or
        # several of them are in before the first stops the rest is down to timing.
        ("handlers.exiting_setup:handle", "exited before it was ready (exit code 3)"),
    ],
)
def test_a_setup_that_fails_at_once_exits_workers_every_time(
    short_tmp: Path, handler: str, says: str
) -> None:
    config = base_config(short_tmp, pool={"size": 4, "handler": handler})
    for attempt in range(6):
        daemon = failed_start(short_tmp, config)
        try:
            assert daemon.proc.returncode == EXIT_WORKERS, (attempt, "\n".join(daemon.lines))
            failed = assert_one_error_line(daemon, "daemon.workers_failed")
            assert says in str(failed["error"])
        finally:
            daemon.close()


def _socket_refused(tmp: Path, path: str) -> dict[str, object]:
    """A daemon with `server.socket = path` exits 4, with one line, before any worker ran."""
    daemon = failed_start(tmp, base_config(tmp, server={"socket": path}))
    try:
        assert daemon.proc.returncode == EXIT_SOCKET, "\n".join(daemon.lines)
        refused = assert_one_error_line(daemon, "daemon.socket_unusable")
        assert not daemon.of("worker.ready"), "a bad socket path is found before workers start"
        return refused
    finally:
        daemon.close()


def test_a_symlink_at_the_lock_is_refused(short_tmp: Path) -> None:
    target = short_tmp / "elsewhere"
    target.write_text("precious")
    (short_tmp / "q.sock.lock").symlink_to(target)
    refused = _socket_refused(short_tmp, str(short_tmp / "q.sock"))
    assert "q.sock.lock is a symlink" in str(refused["error"])
    assert target.read_text() == "precious"


def test_a_socket_path_too_long_is_refused(short_tmp: Path) -> None:
    path = short_tmp / ("x" * (120 - len(str(short_tmp))))
    refused = _socket_refused(short_tmp, str(path))
    assert "107" in str(refused["error"])
    assert not path.exists()


def test_a_socket_directory_whose_parent_is_missing_is_refused(short_tmp: Path) -> None:
    refused = _socket_refused(short_tmp, str(short_tmp / "missing" / "run" / "q.sock"))
    assert f"{short_tmp / 'missing'} does not exist" in str(refused["error"])


# -- the same checks where the socket is bound, for what changes after the first look ----------


def test_lock_refuses_a_symlink_planted_later(short_tmp: Path) -> None:
    (short_tmp / "q.sock.lock").symlink_to(short_tmp / "elsewhere")
    with pytest.raises(SocketInUse, match="is a symlink"):
        lock(short_tmp / "q.sock")
    assert not (short_tmp / "elsewhere").exists()


def test_bind_refuses_a_path_too_long(short_tmp: Path) -> None:
    with pytest.raises(SocketInUse, match="107"):
        bind(short_tmp / ("x" * 120), None)


def test_bind_turns_an_os_error_into_one_line(short_tmp: Path) -> None:
    (short_tmp / "file").write_text("")
    with pytest.raises(SocketInUse, match=r"cannot bind .*: Not a directory"):
        bind(short_tmp / "file" / "q.sock", None)


def test_secure_directory_refuses_a_missing_parent(short_tmp: Path) -> None:
    with pytest.raises(SocketInUse, match="does not exist"):
        secure_directory(short_tmp / "missing" / "run", None)
