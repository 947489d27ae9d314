"""`qoper8ctl` against a real daemon: in-process through `ctl_main` (output from capsys), and as
a real process where a terminal-free stdin, another user or the console script matter."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from qoper8d.cli import (
    CTL_DEGRADED,
    CTL_FAILED,
    CTL_NOT_RUNNING,
    CTL_OK,
    CTL_UNKNOWN,
    CTL_USAGE,
    ctl_main,
    format_status,
    status_problems,
)
from tests.harness import ROOT, SNAPSHOT_FIELDS, running_daemon

CTL = "import sys; from qoper8d.cli import ctl_main; sys.exit(ctl_main())"
NOBODY = 65534


def run_ctl(
    *args: str, stdin: bytes = b"", user: int | None = None
) -> subprocess.CompletedProcess[str]:
    """qoper8ctl as its own process (as `user`, through setpriv, if given)."""
    command = [sys.executable, "-c", CTL, *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    done = subprocess.run(
        command,
        cwd=ROOT,
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done


def feed_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_status_of_a_healthy_daemon(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(short_tmp) as d:
        assert ctl_main(["--socket", str(d.socket), "status"]) == CTL_OK
        out, err = capsys.readouterr()
        assert err == ""
        first, header, *rows = out.splitlines()
        assert first.startswith("running: 2 workers (0 busy, 2 idle), 0 queued, 0 restarts, up ")
        assert header.split() == ["slot", "pid", "state", "actions", "restarts", "uptime", "rss"]
        assert len(rows) == 2
        snapshot = json.loads(_json_status(d.socket, capsys))
        for row, worker in zip(rows, snapshot["workers"], strict=True):
            slot, pid, state, *_ = row.split()
            assert (int(slot), int(pid), state) == (worker["slot"], worker["pid"], "idle")


def _json_status(socket: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert ctl_main(["status", "--json", "--socket", str(socket)]) == CTL_OK
    return capsys.readouterr().out


def test_status_json_is_the_snapshot(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(short_tmp) as d:
        # --config finds the socket as the daemon does.
        assert ctl_main(["--config", str(d.config_path), "status", "--json"]) == CTL_OK
        out = capsys.readouterr().out
    assert out.count("\n") == 1
    snapshot = json.loads(out)
    assert set(snapshot) == SNAPSHOT_FIELDS
    assert snapshot["daemon"]["socket"] == str(d.socket)
    assert [w["slot"] for w in snapshot["workers"]] == [0, 1]


def test_status_shows_a_long_running_action_and_degraded_states() -> None:
    snapshot: dict[str, Any] = {
        "state": "running",
        "size": 2,
        "busy": 1,
        "idle": 0,
        "queued": 0,
        "in_flight": 1,
        "submitted": 3,
        "restarts": 4,
        "uptime": 3725.0,
        "outcomes": {"result": 2, "worker_lost": 0},
        "workers": [
            {"slot": 0, "pid": 10, "state": "busy", "actions_done": 2, "restarts": 0,
             "uptime": 75.5, "rss_bytes": 15 << 20, "running_for": 12.34, "in_flight": 1},
            {"slot": 1, "pid": None, "state": "backoff", "actions_done": 0, "restarts": 4,
             "uptime": 0.0, "rss_bytes": None, "running_for": None, "in_flight": 0},
        ],
        "daemon": {"pid": 1, "version": "0.1.0", "socket": "/x.sock"},
    }  # fmt: skip
    first, _, busy, backoff = format_status(snapshot).splitlines()
    assert first == "running: 2 workers (1 busy, 0 idle), 0 queued, 4 restarts, up 1h02m"
    assert busy.split() == ["0", "10", "busy", "12.3s", "2", "0", "1m15s", "15.0", "MiB"]
    assert backoff.split() == ["1", "-", "backoff", "0", "4", "-", "-"]
    assert status_problems(snapshot) == ["slot 1 is backoff"]
    assert status_problems({**snapshot, "state": "draining", "workers": []}) == [
        "the pool is draining"
    ]


def test_status_degraded_exit_code(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A slot waiting out a long backoff after its worker died again is a slot without a
    # worker (the first crash restarts at once; the second backs off).
    sections: dict[str, Any] = {"pool": {"size": 1}, "supervisor": {"backoff_initial": 60.0}}
    with running_daemon(short_tmp, **sections) as d:
        for _ in range(2):
            code = ctl_main(["--socket", str(d.socket), "submit", '{"mode": "sigkill"}'])
            assert code == CTL_FAILED
        capsys.readouterr()
        d.wait_event("worker.backoff")
        assert ctl_main(["--socket", str(d.socket), "status"]) == CTL_DEGRADED
        out, err = capsys.readouterr()
        assert err.startswith("degraded: slot ")
        assert "backoff" in out


def test_status_without_a_daemon(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = short_tmp / "missing.sock"
    assert ctl_main(["--socket", str(missing), "status"]) == CTL_NOT_RUNNING
    assert capsys.readouterr().err == f"no daemon: no socket at {missing}\n"

    import socket

    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))
    assert ctl_main(["status", "--socket", str(stale)]) == CTL_NOT_RUNNING
    assert capsys.readouterr().err == f"no daemon: nothing listening on {stale} (stale socket)\n"

    # The other commands say the same.
    assert ctl_main(["--socket", str(missing), "submit", "{}"]) == CTL_NOT_RUNNING
    assert ctl_main(["--socket", str(missing), "stop"]) == CTL_NOT_RUNNING


def test_usage_errors(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_main([]) == CTL_USAGE
    assert ctl_main(["frobnicate"]) == CTL_USAGE
    assert ctl_main(["scale", "many"]) == CTL_USAGE
    bad = short_tmp / "bad.toml"
    bad.write_text("[server]\nsokcet = 1\n")
    assert ctl_main(["--config", str(bad), "status"]) == CTL_USAGE
    assert "server.sokcet: unknown key" in capsys.readouterr().err
    assert ctl_main(["--socket", str(short_tmp / "x"), "submit", "{nope"]) == CTL_USAGE
    assert "invalid ACTION_JSON" in capsys.readouterr().err


needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0,
    reason="running as another user needs setpriv and root",
)


@needs_setpriv
def test_status_as_a_user_who_may_not_use_the_socket(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        # The socket's directory is 0700 root: nobody cannot even reach the socket.
        done = run_ctl("--socket", str(d.socket), "status", user=NOBODY)
        assert done.returncode == CTL_UNKNOWN, done.stderr
        assert done.stderr == f"permission denied: {d.socket}\n"


@needs_setpriv
def test_status_as_a_user_the_daemon_refuses(short_tmp: Path) -> None:
    # With a socket group, nobody reaches the socket, and the daemon itself says no.
    with running_daemon(short_tmp, server={"socket_group": str(NOBODY)}) as d:
        # Let nobody through to the socket's own directory (searchable, not listable).
        os.chmod(short_tmp, 0o711)  # noqa: S103
        done = run_ctl("--socket", str(d.socket), "status", user=NOBODY)
        assert done.returncode == CTL_UNKNOWN, done.stderr
        assert done.stderr.startswith(f"permission denied: {d.socket} (uid {NOBODY} may not")


def test_submit_one_action(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(short_tmp) as d:
        socket = str(d.socket)
        assert ctl_main(["--socket", socket, "submit", '{"mode": "ok", "n": 1}']) == CTL_OK
        assert capsys.readouterr().out == '{"mode":"ok","n":1}\n'

        assert ctl_main(["--socket", socket, "submit", '{"mode": "raise"}']) == CTL_FAILED
        out, err = capsys.readouterr()
        assert json.loads(out)["error"]["code"] == "handler_error"
        assert err == "action failed: handler_error: boom\n"

        code = ctl_main(
            ["--socket", socket, "submit", "--action-timeout", "0.2", '{"mode": "hang"}']
        )
        assert code == CTL_FAILED
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "timeout"

        assert ctl_main(["--socket", socket, "submit", "{not json"]) == CTL_USAGE
        assert "invalid ACTION_JSON" in capsys.readouterr().err


def test_submit_ndjson_from_stdin(
    short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    actions: list[Any] = [{"mode": "ok", "i": i} for i in range(1000)]
    actions[613] = {"mode": "raise", "message": "line 614"}
    data = b"".join(json.dumps(a).encode() + b"\n" for a in actions[:500])
    data += b"\n   \n"  # blank lines are skipped
    data += b"".join(json.dumps(a).encode() + b"\n" for a in actions[500:])
    with running_daemon(short_tmp) as d:
        feed_stdin(monkeypatch, data)
        assert ctl_main(["--socket", str(d.socket), "submit"]) == CTL_FAILED
        out, err = capsys.readouterr()
        assert err == "1 of 1000 actions failed\n"
        results = [json.loads(line) for line in out.splitlines()]
        assert len(results) == 1000
        assert results[613]["error"]["code"] == "handler_error"
        assert results[613]["error"]["message"] == "line 614"
        assert results[:613] + results[614:] == actions[:613] + actions[614:]

        # An invalid line: what came before it runs and prints; the line is named.
        feed_stdin(monkeypatch, b'{"mode": "ok"}\n\n{"mode": \n{"mode": "ok"}\n')
        assert ctl_main(["--socket", str(d.socket), "submit"]) == CTL_USAGE
        out, err = capsys.readouterr()
        assert out == '{"mode":"ok"}\n'
        assert err.startswith("stdin line 3: invalid JSON")

        feed_stdin(monkeypatch, b"")
        assert ctl_main(["--socket", str(d.socket), "submit"]) == CTL_OK
        assert capsys.readouterr().out == ""


def test_the_console_script(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        done = run_ctl("--socket", str(d.socket), "status")
        assert done.returncode == CTL_OK, done.stderr
        assert done.stdout.startswith("running: 2 workers")

        lines = b"".join(b'{"mode": "ok", "i": %d}\n' % i for i in range(300))
        done = run_ctl("--socket", str(d.socket), "submit", stdin=lines)
        assert done.returncode == CTL_OK, done.stderr
        assert [json.loads(x)["i"] for x in done.stdout.splitlines()] == list(range(300))


def test_a_progress_bar_on_a_terminal(short_tmp: Path) -> None:
    lines = b"".join(b'{"mode": "ok", "i": %d}\n' % i for i in range(2000))
    source = short_tmp / "actions.ndjson"
    source.write_bytes(lines)
    main, terminal = pty.openpty()
    try:
        with running_daemon(short_tmp) as d, source.open("rb") as stdin:
            done = subprocess.run(
                [sys.executable, "-c", CTL, "--socket", str(d.socket), "submit"],
                cwd=ROOT,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=terminal,
                timeout=30,
                check=False,
            )
        os.close(terminal)
        terminal = -1
        shown = b""
        with contextlib.suppress(OSError):  # EIO: the terminal's other end is closed
            while chunk := os.read(main, 65536):
                shown += chunk
    finally:
        os.close(main)
        if terminal >= 0:
            os.close(terminal)
    assert done.returncode == CTL_OK
    assert len(done.stdout.splitlines()) == 2000
    # Each redraw starts with a carriage return; the terminal turns the final \n into \r\n.
    last = [part for part in shown.decode().split("\r") if part.strip()][-1]
    assert "[########################] 100%" in last
    assert "2,000 done, 0 failed" in last


def test_scale_and_reload(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(short_tmp) as d:
        socket = str(d.socket)
        assert ctl_main(["--socket", socket, "scale", "3"]) == CTL_OK
        assert capsys.readouterr().out == "scaled to 3 workers\n"
        assert len(json.loads(_json_status(d.socket, capsys))["workers"]) == 3

        assert ctl_main(["--socket", socket, "scale", "0"]) == CTL_FAILED
        assert capsys.readouterr().err.startswith("scale failed: bad_request: ")

        # reload compares the file with what runs: 3 workers since the scale above.
        d.config["pool"]["size"] = 1
        d.config_path.write_text(tomli_w.dumps(d.config))
        assert ctl_main(["--socket", socket, "reload"]) == CTL_OK
        assert capsys.readouterr().out == "pool.size: 3 -> 1\n"
        assert len(json.loads(_json_status(d.socket, capsys))["workers"]) == 1
        assert ctl_main(["--socket", socket, "reload"]) == CTL_OK
        assert capsys.readouterr().out == "reloaded: nothing changed\n"

        d.config_path.write_text("[pool]\nsize = 0\n")
        assert ctl_main(["--socket", socket, "reload"]) == CTL_FAILED
        err = capsys.readouterr().err
        assert err.startswith("reload failed: config_error: ")
        assert err.count("\n") == 1


def test_drain(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(short_tmp) as d:
        assert ctl_main(["--socket", str(d.socket), "drain"]) == CTL_OK
        assert capsys.readouterr().out.startswith("drained")
        assert d.wait() == 0


def test_stop(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_daemon(short_tmp) as d:
        assert ctl_main(["stop", "--grace", "1", "--socket", str(d.socket)]) == CTL_OK
        assert capsys.readouterr().out == "stopping (grace 1 s)\n"
        assert d.wait() == 0
        d.wait_event("daemon.stopping", lambda e: e.get("grace_period") == 1.0)


def test_qoper8_socket_names_the_socket(
    short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qoper8d import Client

    elsewhere = short_tmp / "elsewhere.sock"
    other = short_tmp / "other.toml"
    other.write_text(tomli_w.dumps({"server": {"socket": str(short_tmp / "from-config.sock")}}))
    with running_daemon(short_tmp) as d:
        monkeypatch.setenv("QOPER8_SOCKET", str(d.socket))
        assert ctl_main(["status"]) == CTL_OK
        # It beats --config's server.socket...
        assert ctl_main(["--config", str(other), "status"]) == CTL_OK
        with Client() as client:
            assert client.status()["daemon"]["socket"] == str(d.socket)
        capsys.readouterr()

        # ...and --socket beats it.
        monkeypatch.setenv("QOPER8_SOCKET", str(elsewhere))
        assert ctl_main(["--socket", str(d.socket), "status"]) == CTL_OK
        assert ctl_main(["status"]) == CTL_NOT_RUNNING
        assert capsys.readouterr().err == f"no daemon: no socket at {elsewhere}\n"
        # A --config file is still read (a bad one is reported) though the variable wins.
        assert ctl_main(["--config", str(short_tmp / "typo.toml"), "status"]) == CTL_USAGE
        assert "typo.toml: cannot read the file" in capsys.readouterr().err

        # Empty is unset: --config decides again.
        monkeypatch.setenv("QOPER8_SOCKET", "")
        assert ctl_main(["--config", str(d.config_path), "status"]) == CTL_OK


async def test_qoper8_socket_for_the_async_client(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio

    from qoper8d import open_client

    with running_daemon(short_tmp) as d:
        monkeypatch.setenv("QOPER8_SOCKET", str(d.socket))
        with trio.fail_after(20):
            async with open_client() as client:
                assert (await client.status())["daemon"]["socket"] == str(d.socket)
