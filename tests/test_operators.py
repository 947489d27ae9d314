"""What an operator sees: failures in the logs, snapshots with rates, process titles,
reloads that keep the command line's overrides and always say how they went."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import tomli_w
import trio
import trio.testing

from qoper8d import monitor
from qoper8d._console import ConsoleRenderer, snapshot_line
from qoper8d.cli import CTL_FAILED, CTL_OK, EXIT_CONFIG, EXIT_OK, ctl_main, daemon_main
from tests.harness import ROOT, Connection, Daemon, Event, base_config, running_daemon

pytestmark = pytest.mark.timeout(60)


def test_a_handler_error_is_logged_with_its_action_and_its_traceback_at_debug(
    short_tmp: Path,
) -> None:
    with (
        running_daemon(short_tmp, monitor={"log_level": "debug"}) as d,
        Connection(d.socket) as c,
    ):
        answer = c.request(
            {
                "id": 1,
                "op": "submit",
                "action": {"mode": "raise", "message": "boom", "pad": "x" * 500},
            }
        )
        assert answer["error"]["code"] == "handler_error"
        event = d.wait_event("action.failed")
        assert event["type"] == "ValueError"
        assert event["message"] == "boom"
        assert event["level"] == "warning"
        status = c.request({"id": 2, "op": "status"})["result"]
        assert event["pid"] in {w["pid"] for w in status["workers"]}
        assert event["slot"] in (0, 1)
        assert event["action"].startswith('{"mode":"raise"')
        assert "more bytes" in event["action"], "the action is cut to a few hundred bytes"
        traceback = d.wait_event("action.failed.traceback")
        assert traceback["level"] == "debug"
        assert "ValueError: boom" in traceback["traceback"]


def test_action_failed_events_are_rate_limited(short_tmp: Path) -> None:
    with (
        running_daemon(short_tmp, pool={"size": 1, "output_rate": 5.0}) as d,
        Connection(d.socket) as c,
    ):
        c.send(*[{"id": i, "op": "submit", "action": {"mode": "raise"}} for i in range(100)])
        answers = c.receive_all(100)
        assert {a["error"]["code"] for a in answers} == {"handler_error"}
        c.request({"id": "last", "op": "submit", "action": {"mode": "raise"}})
        logged = d.of("action.failed")
        assert 5 <= len(logged) < 20, len(logged)


# -- reload ------------------------------------------------------------------------------------


def _reloads(d: Daemon, count: int) -> list[Event]:
    return d.wait_count("daemon.reloaded", count)


def test_a_reload_keeps_the_command_lines_overrides_and_logs_every_outcome(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The file says 2 workers running handlers.crash; the command line says 1 running echo.
    daemon = Daemon(
        short_tmp,
        base_config(short_tmp),
        args=("--size", "1", "--handler", "handlers.echo:handle"),
    )
    try:
        with Connection(daemon.socket) as c:
            before = c.request({"id": 1, "op": "status"})["result"]
            assert before["size"] == 1
            pids = [w["pid"] for w in before["workers"]]

            # Unchanged file, three ways: the socket op, qoper8ctl, SIGHUP.
            assert c.request({"id": 2, "op": "reload"})["result"] == {"changed": []}
            assert ctl_main(["--socket", str(daemon.socket), "reload"]) == CTL_OK
            assert capsys.readouterr().out == "reloaded: nothing changed\n"
            daemon.signal(signal.SIGHUP)
            logged = _reloads(daemon, 3)
            assert [(e["via"], e["changes"]) for e in logged] == [
                ("socket", []),
                ("socket", []),
                ("SIGHUP", []),
            ]
            after = c.request({"id": 3, "op": "status"})["result"]
            assert [w["pid"] for w in after["workers"]] == pids, "nothing was replaced"
            # echo gives the action back; handlers.crash would give its pid.
            answer = c.request({"id": 4, "op": "submit", "action": {"mode": "pid"}})
            assert answer["result"] == {"mode": "pid"}

            # A change to a key no flag names applies; the flags still win.
            daemon.config["pool"]["max_batch_bytes"] = 4096
            daemon.config_path.write_text(tomli_w.dumps(daemon.config))
            changed = c.request({"id": 5, "op": "reload"})["result"]["changed"]
            assert changed == ["pool.max_batch_bytes: 8192 -> 4096"]
            assert _reloads(daemon, 4)[-1]["changes"] == changed

            # A scale lasts until the next reload, which makes the pool what the file and
            # the flags say again.
            assert c.request({"id": 6, "op": "scale", "size": 2})["result"] == {"size": 2}
            assert c.request({"id": 7, "op": "reload"})["result"] == {
                "changed": ["pool.size: 2 -> 1"]
            }

            # The log level applies at once; the log format waits for a restart.
            daemon.config["monitor"].update(log_level="debug", log_format="console")
            daemon.config["pool"]["routes"] = {"boom": "handlers.crash:handle"}
            daemon.config_path.write_text(tomli_w.dumps(daemon.config))
            assert c.request({"id": 8, "op": "reload"})["result"]["changed"] == [
                "pool.routes: {} -> {'boom': 'handlers.crash:handle'}",
                "monitor.log_format: 'json' -> 'console' (takes effect after a restart)",
                "monitor.log_level: 'info' -> 'debug'",
            ]
            c.request({"id": 9, "op": "submit", "action": {"type": "boom", "mode": "raise"}})
            daemon.wait_event("action.failed.traceback")  # a debug event, JSON still

            # A broken file changes nothing, and says so in the log too, whoever asked.
            daemon.config_path.write_text("[pool]\nsize = 0\n")
            assert c.request({"id": 10, "op": "reload"})["error"]["code"] == "config_error"
            assert ctl_main(["--socket", str(daemon.socket), "reload"]) == CTL_FAILED
            daemon.signal(signal.SIGHUP)
            failed = daemon.wait_count("daemon.reload_failed", 3)
            assert [e["via"] for e in failed] == ["socket", "socket", "SIGHUP"]
            assert all(e["level"] == "error" for e in failed)
            assert all(any("pool.size" in line for line in e["errors"]) for e in failed)
            assert c.request({"id": 11, "op": "status"})["result"]["size"] == 1
        assert daemon.stop() == 0
    finally:
        daemon.close()


# -- snapshots: rates, and one short line on a console -----------------------------------------


def test_snapshot_rates_add_up_to_the_counters(short_tmp: Path) -> None:
    """Off a terminal each snapshot is a JSON line with `rates`; rate x seconds, summed over
    the snapshots, gives back what the counters say was submitted and how it ended."""
    with running_daemon(short_tmp, monitor={"interval": 0.2}) as d, Connection(d.socket) as c:
        c.send(*[{"id": i, "op": "submit", "action": {"mode": "ok"}} for i in range(6)])
        c.send(*[{"id": i, "op": "submit", "action": {"mode": "raise"}} for i in range(6, 8)])
        c.receive_all(8)
        last = d.wait_event("pool.snapshot", lambda e: e["submitted"] == 8)
        snapshots = d.of("pool.snapshot")
        snapshots = snapshots[: snapshots.index(last) + 1]
    assert all(set(e["rates"]) == {"seconds", "submitted", "outcomes"} for e in snapshots)

    def total(rate: Any) -> float:
        return sum(float(rate(e["rates"])) * float(e["rates"]["seconds"]) for e in snapshots)

    assert total(lambda r: r["submitted"]) == pytest.approx(8, abs=0.05)
    assert total(lambda r: r["outcomes"].get("result", 0)) == pytest.approx(6, abs=0.05)
    assert total(lambda r: r["outcomes"].get("handler_error", 0)) == pytest.approx(2, abs=0.05)
    assert sum(e["rates"]["seconds"] for e in snapshots) == pytest.approx(last["uptime"], abs=0.01)


def test_the_console_snapshot_line() -> None:
    snapshot = {
        "state": "running",
        "queued": 1700,
        "restarts": 3,
        "workers": [{"state": "busy"}, {"state": "busy"}, {"state": "idle"}, {"state": "backoff"}],
        "rates": {
            "seconds": 30.0,
            "submitted": 1240.4,
            "outcomes": {"result": 1238.0, "handler_error": 1.5, "timeout": 0.5},
        },
    }
    assert snapshot_line(snapshot) == (
        "running: 2 busy, 1 idle, 1 backoff, queue 1,700, in 1,240/s, done 1,238/s, "
        "failed 2/s, 3 restarts"
    )


def test_the_console_shows_blocks_on_their_own_lines_and_no_raw_control_characters() -> None:
    render = ConsoleRenderer(colours=False)
    text = render(
        None,
        "debug",
        {
            "event": "action.failed.traceback",
            "level": "debug",
            "timestamp": "2026-12-02T02:00:00.123456Z",
            "slot": 1,
            "traceback": "Traceback (most recent call last):\n  x\nValueError: \x1b[2Jgone\n",
            "note": "\x1b]0;title\x07\u202e",
        },
    )
    assert text.splitlines() == [
        "02:00:00.123 debug    action.failed.traceback slot=1 note=\\x1b]0;title\\x07\\u202e",
        "    Traceback (most recent call last):",
        "      x",
        "    ValueError: \\x1b[2Jgone",
    ]


def _console_daemon(tmp: Path, stderr: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    config = base_config(tmp, monitor={"log_format": "auto", "interval": 0.2, "log_level": "debug"})
    path = tmp / "qoper8.toml"
    path.write_text(tomli_w.dumps(config))
    return subprocess.Popen(
        [sys.executable, "-m", "qoper8d", "--config", str(path)],
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "", "FORCE_COLOR": "", **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def _read_until(fd: int, done: Any, deadline: float) -> str:
    """What the daemon wrote to `fd` until `done(text)` holds (or the deadline fails)."""
    shown = b""
    while not done(shown.decode("utf-8", "replace")):
        left = deadline - time.monotonic()
        assert left > 0, shown.decode("utf-8", "replace")[-3000:]
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, shown.decode("utf-8", "replace")[-3000:]
            shown += chunk
    return shown.decode("utf-8", "replace")


def _watch_console(tmp: Path, read: int, proc: subprocess.Popen[bytes]) -> str:
    """Wait for the daemon's start, fail one action, and return the log up to the first
    snapshot that counts the failure."""
    deadline = time.monotonic() + 30
    try:
        _read_until(read, lambda t: "daemon.started" in t, deadline)
        with Connection(tmp / "q.sock") as c:
            answer = c.request(
                {"id": 1, "op": "submit", "action": {"mode": "raise", "message": "boom"}}
            )
            assert answer["error"]["code"] == "handler_error"
        plain = re.compile(r"\x1b\[[0-9;]*m")
        text = _read_until(
            read,
            lambda t: re.search(r"pool\.snapshot.* failed [1-9]", plain.sub("", t)) is not None,
            deadline,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    return text


def test_on_a_terminal_a_snapshot_is_one_coloured_line_and_a_traceback_its_own_lines(
    short_tmp: Path,
) -> None:
    main, terminal = pty.openpty()
    try:
        proc = _console_daemon(short_tmp, terminal, {})
        os.close(terminal)
        terminal = -1
        shown = _watch_console(short_tmp, main, proc)
    finally:
        os.close(main)
        if terminal >= 0:
            os.close(terminal)
    assert "\x1b[" in shown, "colour on a terminal"
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in shown.split("\r\n")]
    assert not [line for line in lines if line.startswith("{")], "no JSON on a terminal"
    snapshot = next(line for line in lines if "pool.snapshot" in line and "failed 0/s" not in line)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} info     pool\.snapshot running: 0 busy, 2 idle, queue 0, "
        r"in [\d.]+/s, done 0/s, failed [\d.]+/s, 0 restarts",
        snapshot,
    ), snapshot
    start = lines.index("    Traceback (most recent call last):")
    assert "action.failed.traceback" in lines[start - 1]
    assert "    ValueError: boom" in lines[start:]


def test_no_color_and_force_color(short_tmp: Path) -> None:
    """On a pipe, FORCE_COLOR picks console lines over JSON; NO_COLOR still takes the colour
    away (no-color.org: any non-empty value)."""
    read, write = os.pipe()
    try:
        proc = _console_daemon(short_tmp, write, {"FORCE_COLOR": "1", "NO_COLOR": "1"})
        os.close(write)
        write = -1
        shown = _watch_console(short_tmp, read, proc)
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    assert "\x1b" not in shown
    assert re.search(r"^\S+ info     pool\.snapshot running: ", shown, re.M)
    assert "\n    ValueError: boom\n" in shown


# -- --check-config runs what a worker runs before it is ready -----------------------------------


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the throwaway worker imports handlers/ from the current directory


def _check_config(
    capsys: pytest.CaptureFixture[str], tmp: Path, pool: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """`qoper8d --check-config`, in this process (its throwaway worker is a process still)."""
    path = tmp / "check.toml"
    path.write_text(tomli_w.dumps({"pool": pool}))
    code = daemon_main(["--config", str(path), "--check-config"])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


@pytest.mark.usefixtures("in_root")
def test_check_config_runs_setup_and_fails_on_one_line_when_it_raises(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_tmp / "check.toml"
    done = _check_config(capsys, short_tmp, {"handler": "handlers.broken_setup:handle"})
    assert done.returncode == EXIT_CONFIG
    assert done.stderr == (
        f"{path}: pool.handler: handlers.broken_setup.setup() raised RuntimeError: "
        "setup failed on purpose\n"
    )
    # A route's module is set up too, and named by its key.
    done = _check_config(
        capsys,
        short_tmp,
        {"handler": "handlers.echo:handle", "routes": {"boom": "handlers.broken_setup:handle"}},
    )
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.startswith(f"{path}: pool.routes.boom: handlers.broken_setup.setup()")
    # One that exits, or never returns, is named too.
    done = _check_config(capsys, short_tmp, {"handler": "handlers.exiting_setup:handle"})
    assert (done.returncode, done.stderr) == (
        EXIT_CONFIG,
        f"{path}: pool.handler: handlers.exiting_setup.setup() exited (SystemExit 3)\n",
    )
    done = _check_config(
        capsys, short_tmp, {"handler": "handlers.hang_setup:handle", "start_timeout": 0.5}
    )
    assert (done.returncode, done.stderr) == (
        EXIT_CONFIG,
        f"{path}: pool.handler: importing it and its setup() took longer than "
        "pool.start_timeout (0.5 s)\n",
    )
    # A setup that succeeds (and its teardown) passes; an async module's runs on its loop.
    done = _check_config(capsys, short_tmp, {"handler": "handlers.lifecycle:handle"})
    assert (done.returncode, done.stdout) == (EXIT_OK, f"{path}: ok\n"), done.stderr


@pytest.mark.usefixtures("in_root")
def test_check_config_notices_a_trio_route_under_asyncio(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_tmp / "check.toml"
    pool: dict[str, Any] = {
        "handler": "handlers.sleep:handle_async",  # anyio: fine on either loop
        "routes": {"t": "handlers.trio_only:handle"},
        "async_backend": "asyncio",
    }
    done = _check_config(capsys, short_tmp, pool)
    assert done.returncode == EXIT_CONFIG
    assert done.stderr == (
        f"{path}: pool.routes.t: 'handlers.trio_only:handle' is an async handler that calls "
        'trio, but pool.async_backend is "asyncio" (set it to "trio", or write it with anyio)\n'
    )
    done = _check_config(capsys, short_tmp, {**pool, "async_backend": "trio"})
    assert done.returncode == EXIT_OK, done.stderr
    done = _check_config(
        capsys, short_tmp, {"handler": "handlers.sleep:handle_async", "async_backend": "asyncio"}
    )
    assert done.returncode == EXIT_OK, done.stderr


async def test_lines_past_the_backlog_are_dropped_and_counted_in_the_logs_own_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(monitor, "MAX_BACKLOG", 5)
    read, write = os.pipe()
    stream = os.fdopen(write, "w")
    shown = b""
    async with trio.lowlevel.FdStream(read) as pipe:
        writer = monitor.configure_logging("console", stream=stream)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.serve)
                await trio.testing.wait_all_tasks_blocked()
                writer.msg("x" * 100_000)  # more than the pipe holds: the writer parks
                await trio.testing.wait_all_tasks_blocked()
                for i in range(12):
                    writer.msg(f"line {i}")
                while b"log.dropped" not in shown:
                    shown += await pipe.receive_some()
                nursery.cancel_scope.cancel()
        stream.close()
    tail = shown.decode().split("\n")[1:-1]
    assert tail[:5] == [f"line {i}" for i in range(5)], "the oldest lines are kept"
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} warning  log\.dropped lines=7", tail[5]), tail


def test_log_format_json_wins_over_force_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    shown: dict[str, str] = {}
    for log_format in ("json", "auto", "console"):
        stream = io.StringIO()  # not a terminal
        monitor.configure_logging(log_format, stream=stream)
        structlog.get_logger().info("e", a=1)
        shown[log_format] = stream.getvalue()
    assert json.loads(shown["json"])["a"] == 1
    assert "\x1b[" in shown["auto"]
    # The same line but for its timestamp (the two are logged a millisecond apart at times).
    assert shown["auto"].split(" ", 1)[1] == shown["console"].split(" ", 1)[1]
    monkeypatch.setenv("NO_COLOR", "1")
    stream = io.StringIO()
    monitor.configure_logging("auto", stream=stream)
    structlog.get_logger().info("e", a=1)
    assert re.fullmatch(r"\S+ info     e a=1\n", stream.getvalue())
