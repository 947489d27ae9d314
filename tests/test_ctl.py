"""`qoper8ctl` against a real daemon: in-process through `ctl_main` (output from capsys), and as
a real process where a terminal-free stdin, another user or the console script matter."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
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


# -- submit tells the truth: results counted, typed lines answered at once, --keep-going -------


def _drain_terminal(main: int) -> bytes:
    shown = b""
    with contextlib.suppress(OSError):  # EIO: the terminal's other end is closed
        while chunk := os.read(main, 65536):
            shown += chunk
    return shown


def _bar(shown: bytes) -> str:
    """The last state of a bar redrawn with carriage returns."""
    return [part for part in shown.decode().split("\r") if "%" in part][-1]


def test_typed_lines_are_answered_before_the_next_is_typed(short_tmp: Path) -> None:
    main, terminal = pty.openpty()
    with running_daemon(short_tmp) as d:
        proc = subprocess.Popen(
            [sys.executable, "-c", CTL, "--socket", str(d.socket), "submit", "--keep-going"],
            cwd=ROOT,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
        shown = b""

        def until(text: bytes) -> None:
            nonlocal shown
            deadline = time.monotonic() + 20
            while text not in shown:
                left = deadline - time.monotonic()
                assert left > 0, f"{text!r} never showed; the terminal shows {shown!r}"
                if select.select([main], [], [], left)[0]:
                    shown += os.read(main, 65536)

        try:
            # Results print compactly, so they are told apart from the echo of what is typed.
            os.write(main, b'{"mode": "ok", "n": 1}\n')
            until(b'{"mode":"ok","n":1}')
            os.write(main, b"{oops\n")
            until(b"stdin line 2: invalid JSON")
            until(b'"line":2')
            os.write(main, b'{"mode": "raise", "message": "no"}\n')
            until(b'"message":"no"')
            os.write(main, b'{"mode": "ok", "n": 4}\n')
            until(b'{"mode":"ok","n":4}')
            os.write(main, b"\x04")  # Ctrl-D: the end of the input
            assert proc.wait(20) == CTL_USAGE, "a malformed line makes the exit status 2"
            shown += _drain_terminal(main)
        finally:
            proc.kill()
            proc.wait()
            os.close(main)
    assert b"\x1b[K" not in shown, "no progress bar over typed input"
    assert b"1 malformed line, 1 of 3 actions failed" in shown


def test_keep_going_pairs_every_input_line_with_an_output_line(
    short_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = short_tmp / "actions.ndjson"
    lines = [b'{"mode": "ok", "i": %d}\n' % i for i in range(50)]
    lines[10] = b'{"mode": "ok", "i": 10\n'
    lines[30] = b"not json at all\n"
    lines[31] = b'{"mode": "raise", "message": "m"}\n'
    source.write_bytes(b"".join(lines))
    with running_daemon(short_tmp) as d, source.open("rb") as raw:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
        assert ctl_main(["--socket", str(d.socket), "submit", "--keep-going"]) == CTL_USAGE
        out, err = capsys.readouterr()
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 50
    assert [
        r["error"]["line"] for r in results if r.get("error", {}).get("code") == "bad_request"
    ] == [11, 31]
    assert results[31]["error"]["code"] == "handler_error"
    assert [r["i"] for r in results if "i" in r] == [i for i in range(50) if i not in (10, 30, 31)]
    complaints = err.splitlines()
    assert complaints[0].startswith("stdin line 11: invalid JSON")
    assert complaints[1].startswith("stdin line 31: invalid JSON")
    assert complaints[2] == "2 malformed lines, 1 of 48 actions failed"
    assert len(complaints) == 3


def test_keep_going_holds_a_bounded_number_of_error_lines(short_tmp: Path) -> None:
    """Malformed lines read while the action before them runs wait for its result; past
    MAX_HELD_ERRORS of them the batch stops, as it would without --keep-going (the actions
    already sent still run and print)."""
    limit = 3
    arrived = short_tmp / "arrived"
    data = json.dumps({"mode": "wait_for", "path": str(arrived)}).encode() + b"\n"
    data += b"x\n" * (limit + 2)
    code = f"from qoper8d import _submit; _submit.MAX_HELD_ERRORS = {limit}; {CTL}"
    with (
        running_daemon(short_tmp) as d,
        subprocess.Popen(
            [sys.executable, "-c", code, "--socket", str(d.socket), "submit", "--keep-going"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc,
    ):
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(data)
        proc.stdin.close()
        # Each malformed line is reported as it is read, the one past the bound too.
        for number in range(2, limit + 3):
            assert proc.stderr.readline().startswith(b"stdin line %d: invalid" % number)
        arrived.touch()  # now the first action may end
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(30)
    assert proc.returncode == CTL_USAGE
    results = [json.loads(line) for line in out.splitlines()]
    assert isinstance(results[0], int), "the wait_for action's result (its worker's pid)"
    assert [r["error"]["line"] for r in results[1:]] == [2, 3, 4]
    assert err.decode() == (
        f"stdin line {limit + 2}: stopped: {limit} malformed lines already wait for the "
        "results of the actions before them\n"
    )


def test_the_bar_counts_results_of_a_known_total(short_tmp: Path) -> None:
    """A regular file's lines are counted first; a pipe's total comes from --total. The bar
    counts results (a malformed line, with --keep-going, is one that failed)."""
    lines = [b'{"mode": "ok", "i": %d}\n' % i for i in range(300)]
    lines[7] = b"{broken\n"
    source = short_tmp / "actions.ndjson"
    source.write_bytes(b"".join(lines))
    shown: list[bytes] = []
    with running_daemon(short_tmp) as d:
        for total, stdin in (([], source.open("rb")), (["--total", "300"], subprocess.PIPE)):
            main, terminal = pty.openpty()
            try:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        CTL,
                        "--socket",
                        str(d.socket),
                        "submit",
                        "--keep-going",
                        *total,
                    ],
                    cwd=ROOT,
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=terminal,
                )
                os.close(terminal)
                out, _ = proc.communicate(source.read_bytes() if total else None, timeout=30)
                shown.append(_drain_terminal(main))
            finally:
                os.close(main)
                if not isinstance(stdin, int):
                    stdin.close()
            assert proc.returncode == CTL_USAGE
            assert len(out.splitlines()) == 300
    for terminal_text in shown:
        assert "stdin line 8: invalid JSON" in terminal_text.decode()
        assert "[########################] 100%  299 done, 1 failed of 300" in _bar(terminal_text)
