"""The daemon as a real process, spoken to over its socket in raw NDJSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from qoper8d.cli import EXIT_CONFIG, EXIT_OK, EXIT_SOCKET
from qoper8d.stats import OUTCOMES
from tests.conftest import cpu_seconds, wait_gone
from tests.harness import (
    ROOT,
    SNAPSHOT_FIELDS,
    Connection,
    Daemon,
    base_config,
    running_daemon,
)

WORKER_FIELDS = {
    "slot",
    "pid",
    "state",
    "actions_done",
    "restarts",
    "uptime",
    "rss_bytes",
    "running_for",
    "in_flight",
}


def run_qoper8d(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m qoper8d ARGS` to its end, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "qoper8d", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_pipelined_requests_are_answered_out_of_order(short_tmp: Path) -> None:
    with (
        running_daemon(short_tmp, pool={"handler": "handlers.sleep:handle"}) as d,
        Connection(d.socket) as c,
    ):
        c.send(
            {"id": "slow", "op": "submit", "action": {"seconds": 0.5}},
            *({"id": i, "op": "submit", "action": {"seconds": 0, "n": i}} for i in range(20)),
        )
        order = [r["id"] for r in c.receive_all(21)]
    assert set(order) == {"slow", *range(20)}
    assert order[-1] == "slow", "fast answers are not held behind the slow one"


def test_a_quiet_daemon_and_its_workers_sleep(short_tmp: Path) -> None:
    """After an answer the daemon polls for the client's next request, and a worker for its
    next batch, for `pool.idle_spin` only: then they sleep and use no CPU."""
    with running_daemon(short_tmp) as d, Connection(d.socket) as c:
        for i in range(50):
            assert c.request({"id": i, "op": "submit", "action": {"n": i}})["ok"]
        status = c.request({"id": "s", "op": "status"})["result"]
        pids = [d.proc.pid, *(w["pid"] for w in status["workers"])]
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(1.0)  # the window the CPU is measured over, not a wait for an event
        used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    # A spin that never ended would use the whole second; sleeping uses none of it.
    assert max(used) < 0.3, dict(zip(pids, used, strict=True))


def test_every_op(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        with Connection(d.socket) as c:
            hello = c.request({"id": 1, "op": "hello"})["result"]
            assert hello["protocol"] == 1
            assert set(hello["ops"]) >= {
                "hello", "submit", "cancel", "status", "scale", "reload", "drain", "shutdown"
            }  # fmt: skip
            assert hello["pid"] == d.proc.pid
            action = {"mode": "ok", "data": [1, "two"]}
            assert c.request({"id": 2, "op": "submit", "action": action}) == {
                "id": 2, "ok": True, "result": action,
            }  # fmt: skip
            status = c.request({"id": 3, "op": "status"})["result"]
            assert set(status) == SNAPSHOT_FIELDS
            assert set(status["outcomes"]) == set(OUTCOMES)
            assert all(set(w) == WORKER_FIELDS for w in status["workers"])
            assert status["daemon"]["socket"] == str(d.socket)
            # cancel: a queued action behind two hung ones.
            c.send(
                {"id": "h1", "op": "submit", "action": {"mode": "hang"}},
                {"id": "h2", "op": "submit", "action": {"mode": "hang"}},
                {"id": "q", "op": "submit", "action": {"mode": "ok"}},
                {"id": 4, "op": "cancel", "target": "q"},
            )
            got = {r["id"]: r for r in c.receive_all(2)}
            assert got["q"]["error"]["code"] == "cancelled"
            assert got[4]["result"] == {"cancelled": True}
            assert c.request({"id": 5, "op": "cancel", "target": "nope"})["result"] == {
                "cancelled": False
            }
            # cancelling a running action replaces its worker
            c.send({"id": 6, "op": "cancel", "target": "h1"})
            got = {r["id"]: r for r in c.receive_all(2)}
            assert got["h1"]["error"]["code"] == "cancelled"
            assert c.request({"id": 7, "op": "scale", "size": 3})["result"] == {"size": 3}
            assert len(c.request({"id": 8, "op": "status"})["result"]["workers"]) == 3
            # reload compares the file with what runs: it undoes the scale.
            assert c.request({"id": 9, "op": "reload"})["result"] == {
                "changed": ["pool.size: 3 -> 2"]
            }
            assert c.request({"id": 12, "op": "reload"})["result"] == {"changed": []}
            c.send({"id": 10, "op": "cancel", "target": "h2"})
            c.receive_all(2)
            assert c.request({"id": 11, "op": "drain"})["result"] == {"drained": True}
        assert d.wait() == EXIT_OK


def test_shutdown_op_stops_the_daemon(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, Connection(d.socket) as c:
        assert c.request({"id": 1, "op": "shutdown"})["result"] == {"stopping": True}
        assert d.wait() == EXIT_OK
    assert not d.socket.exists()


@pytest.mark.parametrize(
    ("line", "code", "closes"),
    [
        (b"this is not json\n", "bad_request", True),
        (b'{"id": 1, "op": "submit", "action": \n', "bad_request", True),
        (b'{"id": 1, "op": "frobnicate"}\n', "unknown_op", False),
        (b'{"id": 1, "op": "submit", "action": 1, "timeout": "soon"}\n', "bad_request", False),
        (b'{"id": 1, "op": "scale", "size": "big"}\n', "bad_request", False),
        (b'{"id": 1, "op": "scale", "size": 0}\n', "bad_request", False),
        (b'{"id": 1.5, "op": "status"}\n', "bad_request", False),
        (b'{"op": "status"}\n', "bad_request", False),
        (b"[1, 2, 3]\n", "bad_request", False),
        (b'{"id": 1, "op": "submit"}\n', "bad_request", False),
        (b'{"id": 1, "op": "submit", "action": 1, "max_attempts": 0}\n', "bad_request", False),
    ],
)
def test_bad_input_gets_the_right_error_and_the_daemon_carries_on(
    short_tmp: Path, line: bytes, code: str, closes: bool
) -> None:
    with running_daemon(short_tmp) as d:
        with Connection(d.socket) as bystander, Connection(d.socket) as c:
            bystander.send({"id": "b", "op": "submit", "action": {"mode": "ok"}})
            c.send(line)
            response = c.receive()
            assert response is not None
            assert response["ok"] is False
            assert response["error"]["code"] == code
            if closes:
                assert response["id"] is None
                assert c.receive() is None, "the connection is closed after that line"
            else:
                assert c.request({"id": "s", "op": "status"})["ok"] is True
            # Other connections never noticed.
            assert bystander.receive() == {"id": "b", "ok": True, "result": {"mode": "ok"}}
        with Connection(d.socket) as again:
            assert again.request({"id": 1, "op": "status"})["result"]["state"] == "running"


def test_an_oversize_line_is_too_large(short_tmp: Path) -> None:
    with running_daemon(short_tmp, server={"max_message_bytes": 4096}) as d:
        with Connection(d.socket) as c:
            c.send(b'{"id": 1, "op": "submit", "action": "' + b"x" * 10_000 + b'"}\n')
            assert c.receive() == {
                "id": None,
                "ok": False,
                "error": {"code": "too_large", "message": "a request line is over 4096 bytes"},
            }
            assert c.receive() is None
        with Connection(d.socket) as c:
            # Just under the limit is fine.
            big = {"mode": "ok", "pad": "y" * 3000}
            assert c.request({"id": 2, "op": "submit", "action": big})["result"] == big


def test_a_worker_killed_from_outside_during_a_submit(short_tmp: Path) -> None:
    with running_daemon(short_tmp, pool={"size": 1}) as d, Connection(d.socket) as c:
        pid = c.request({"id": 1, "op": "submit", "action": {"mode": "pid"}})["result"]
        c.send({"id": 2, "op": "submit", "action": {"mode": "hang"}})
        d.wait_event("worker.output", lambda e: e["line"] == "started hang")
        os.kill(pid, signal.SIGKILL)
        response = c.receive()
        assert response is not None
        assert response["id"] == 2
        assert response["error"]["code"] == "worker_lost"
        assert response["error"]["pid"] == pid
        assert response["error"]["signal"] == "SIGKILL"
        assert c.request({"id": 3, "op": "submit", "action": {"mode": "pid"}})["result"] != pid


def test_socket_and_directory_modes(short_tmp: Path) -> None:
    private = short_tmp / "run"
    with running_daemon(short_tmp, server={"socket": str(private / "q.sock")}) as d:
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
        assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
        assert stat.S_IMODE(os.lstat(d.socket).st_mode) == 0o600


def test_a_second_daemon_is_refused(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        config = short_tmp / "second.toml"
        config.write_text(tomli_w.dumps(d.config))
        done = run_qoper8d("--config", str(config))
        assert done.returncode == EXIT_SOCKET
        assert "another qoper8d" in done.stderr
        with Connection(d.socket) as c:
            assert c.request({"id": 1, "op": "status"})["ok"] is True


def test_a_stale_socket_is_reclaimed(short_tmp: Path) -> None:
    path = short_tmp / "q.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a SIGKILLed daemon leaves behind
    assert path.exists()
    with running_daemon(short_tmp) as d:
        d.wait_event("control.stale_socket")
        with Connection(d.socket) as c:
            assert c.request({"id": 1, "op": "hello"})["ok"] is True


def test_a_symlink_at_the_socket_path_is_refused(short_tmp: Path) -> None:
    target = short_tmp / "elsewhere"
    target.write_text("precious")
    (short_tmp / "q.sock").symlink_to(target)
    daemon = Daemon(short_tmp, base_config(short_tmp), ready=False)
    try:
        assert daemon.wait() == EXIT_SOCKET
        assert any("symlink" in line for line in daemon.lines)
    finally:
        daemon.close()
    assert target.read_text() == "precious"


def test_a_deleted_socket_is_bound_again(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        d.socket.unlink()
        d.wait_event("control.socket_removed")
        d.wait_event("control.listening", lambda e: len(d.of("control.listening")) >= 2)
        with Connection(d.socket) as c:
            assert c.request({"id": 1, "op": "hello"})["ok"] is True


def test_a_half_finished_line_times_out(short_tmp: Path) -> None:
    with running_daemon(short_tmp, server={"read_timeout": 0.3}) as d:
        with Connection(d.socket) as c:
            c.send(b'{"id": 1, "op": "sta')
            response = c.receive()
            assert response is not None
            assert response["error"]["code"] == "read_timeout"
            assert c.receive() is None
        with Connection(d.socket) as idle:  # an idle connection is not timed out
            assert idle.request({"id": 1, "op": "hello"})["ok"] is True


def test_connections_past_the_limit_are_turned_away(short_tmp: Path) -> None:
    with running_daemon(short_tmp, server={"max_connections": 2}) as d:
        with Connection(d.socket) as a, Connection(d.socket) as b:
            assert a.request({"id": 1, "op": "hello"})["ok"]
            assert b.request({"id": 1, "op": "hello"})["ok"]
            with Connection(d.socket) as c:
                response = c.receive()
                assert response is not None
                assert response["error"]["code"] == "too_many_connections"
                assert c.receive() is None
        with Connection(d.socket) as again:
            assert again.request({"id": 1, "op": "hello"})["ok"]


def test_a_client_that_disconnects_has_its_queued_work_cancelled(short_tmp: Path) -> None:
    with running_daemon(short_tmp, pool={"size": 1}) as d:
        with Connection(d.socket) as c:
            c.send(
                {"id": "run", "op": "submit", "action": {"mode": "hang"}},
                *({"id": i, "op": "submit", "action": {"mode": "ok"}} for i in range(5)),
            )
            d.wait_event("worker.output", lambda e: e["line"] == "started hang")
        with Connection(d.socket) as watcher:
            status = watcher.request({"id": 1, "op": "status"})["result"]
            deadline = time.monotonic() + 10
            while status["queued"]:  # the disconnect is noticed asynchronously
                assert time.monotonic() < deadline, "the disconnect was never noticed"
                status = watcher.request({"id": 1, "op": "status"})["result"]
            assert status["outcomes"]["cancelled"] == 6
            # The running action was left to finish (it hangs): its worker was not killed.
            assert status["workers"][0]["state"] == "busy"
            assert status["restarts"] == 0


def test_sigterm_with_work_in_flight_loses_nothing(short_tmp: Path) -> None:
    with running_daemon(
        short_tmp, pool={"handler": "handlers.sleep:handle", "grace_period": 10}
    ) as d:
        with Connection(d.socket) as c:
            c.send(*({"id": i, "op": "submit", "action": {"seconds": 0.01}} for i in range(200)))
            first = c.receive()  # work is flowing
            d.signal(signal.SIGTERM)
            rest = c.receive_all(199)
            responses = [first, *rest]
            assert sorted(r["id"] for r in responses if r) == list(range(200))
            assert all(r and r["ok"] for r in responses)
            late = c.request({"id": "late", "op": "submit", "action": {"seconds": 0}})
            assert late["error"]["code"] == "shutting_down"
        assert d.wait() == EXIT_OK
    stopped = d.of("daemon.stopped")
    assert stopped[0]["outcomes"]["result"] == 200


def test_sighup_reloads_and_changes_the_pool_size(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        config = dict(d.config)
        config["pool"] = {**config["pool"], "size": 3, "max_batch_bytes": 4096}
        d.config_path.write_text(tomli_w.dumps(config))
        d.signal(signal.SIGHUP)
        reloaded = d.wait_event("daemon.reloaded")
        assert "pool.size: 2 -> 3" in reloaded["changes"]
        with Connection(d.socket) as c:
            status = c.request({"id": 1, "op": "status"})["result"]
            assert status["size"] == 3
            assert len([w for w in status["workers"] if w["pid"]]) == 3


def test_a_broken_config_on_reload_changes_nothing(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d:
        d.config_path.write_text("[pool]\nsize = 0\n")
        with Connection(d.socket) as c:
            response = c.request({"id": 1, "op": "reload"})
            assert response["error"]["code"] == "config_error"
            assert any("pool.size" in line for line in response["error"]["errors"])
            assert c.request({"id": 2, "op": "status"})["result"]["size"] == 2


def test_snapshots_are_logged_at_the_interval(short_tmp: Path) -> None:
    with running_daemon(short_tmp, monitor={"interval": 0.2}) as d:
        first = d.wait_event("pool.snapshot")
        d.wait_event("pool.snapshot", lambda e: e is not first)
    snapshots = d.of("pool.snapshot")
    assert len(snapshots) >= 2
    assert set(snapshots[0]) >= SNAPSHOT_FIELDS | {"timestamp", "level"}
    assert all(set(w) == WORKER_FIELDS for w in snapshots[0]["workers"])


def test_worker_exits_and_output_are_logged(short_tmp: Path) -> None:
    with running_daemon(short_tmp, pool={"size": 1}) as d, Connection(d.socket) as c:
        c.request({"id": 1, "op": "submit", "action": {"mode": "flood", "lines": 3}})
        assert (
            c.request({"id": 2, "op": "submit", "action": {"mode": "exit", "code": 7}})["error"][
                "exit_code"
            ]
            == 7
        )
        line = d.wait_event("worker.output", lambda e: e["line"].startswith("flood line 2"))
        assert {"slot", "pid", "stream"} <= set(line)
        exit_event = d.wait_event("worker.exit", lambda e: e.get("exit_code") == 7)
        assert exit_event["reason"] == "crash"
        assert json.loads(exit_event["doing"]) == {"mode": "exit", "code": 7}


def test_check_config_reports_every_problem(short_tmp: Path) -> None:
    bad = short_tmp / "bad.toml"
    bad.write_text(
        '[pool]\nsize = "four"\nhandler = "nope"\nwidgets = 3\n[monitor]\ninterval = 1\n'
    )
    done = run_qoper8d("--config", str(bad), "--check-config")
    assert done.returncode == EXIT_CONFIG
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert any("pool.size: expected an integer" in line for line in lines)
    assert any("pool.handler: expected" in line for line in lines)
    assert any("pool.widgets: unknown key" in line for line in lines)


def test_check_config_imports_the_handler(short_tmp: Path) -> None:
    config = short_tmp / "c.toml"
    config.write_text('[pool]\nhandler = "handlers.nonexistent:handle"\n')
    done = run_qoper8d("--config", str(config), "--check-config")
    assert done.returncode == EXIT_CONFIG
    assert "no module named 'handlers.nonexistent'" in done.stderr
    good = short_tmp / "g.toml"
    good.write_text('[pool]\nhandler = "handlers.echo:handle"\n')
    done = run_qoper8d("--config", str(good), "--check-config")
    assert done.returncode == EXIT_OK, done.stderr


def test_print_config_and_flags_override_only_what_they_name(short_tmp: Path) -> None:
    config = short_tmp / "c.toml"
    config.write_text("[pool]\nsize = 7\nmax_queue = 55\n")
    done = run_qoper8d("--config", str(config), "--size", "3", "--print-config")
    assert done.returncode == EXIT_OK, done.stderr
    import tomllib

    printed = tomllib.loads(done.stdout)
    assert printed["pool"]["size"] == 3
    assert printed["pool"]["max_queue"] == 55
    assert printed["server"]["socket"]


def test_a_handler_that_cannot_start_stops_the_daemon_with_its_exit_code(
    short_tmp: Path,
) -> None:
    from qoper8d.cli import EXIT_WORKERS

    daemon = Daemon(
        short_tmp, base_config(short_tmp, pool={"handler": "handlers.broken_setup:handle"}),
        ready=False,
    )  # fmt: skip
    try:
        assert daemon.wait() == EXIT_WORKERS
        failed = daemon.wait_event("daemon.workers_failed")
        assert "setup failed on purpose" in failed["error"]
        assert not daemon.socket.exists(), "no socket before the workers are ready"
    finally:
        daemon.close()


def test_sigkill_of_the_daemon_takes_every_worker_and_frees_the_socket(short_tmp: Path) -> None:
    config = base_config(short_tmp)
    first = Daemon(short_tmp, config)
    try:
        with Connection(first.socket) as c:
            c.send({"id": 1, "op": "submit", "action": {"mode": "hang"}})
            first.wait_event("worker.output", lambda e: e["line"] == "started hang")
            status = c.request({"id": 2, "op": "status"})["result"]
        pids = {w["pid"] for w in status["workers"]}
        from tests.conftest import descendants

        family = descendants(first.proc.pid)
        assert pids <= family
        first.proc.kill()
        first.proc.wait()
        assert wait_gone(family, 1.0) == set(), "workers outlived their daemon by over 1 s"
    finally:
        first.close()
    # The next start reclaims the socket the dead daemon left behind.
    with running_daemon(short_tmp) as second, Connection(second.socket) as c:
        assert c.request({"id": 1, "op": "hello"})["ok"] is True


def test_unknown_fields_are_ignored_and_ids_echo_exactly(short_tmp: Path) -> None:
    with running_daemon(short_tmp) as d, Connection(d.socket) as c:
        for request_id in (0, -5, "a string", "ünïcode", 2**62):
            response = c.request({"id": request_id, "op": "hello", "extra": {"x": 1}})
            assert response["id"] == request_id
        action = {"mode": "ok", "a": [1, 2.5, None, True]}
        raw = json.dumps({"id": 1, "op": "submit", "action": action})
        c.send(raw.encode() + b"\n")
        assert c.receive() == {"id": 1, "ok": True, "result": action}


def test_ps_tells_the_master_the_fork_server_and_each_worker_apart(short_tmp: Path) -> None:
    def title(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    with running_daemon(short_tmp, pool={"size": 2}) as d, Connection(d.socket) as c:
        status = c.request({"id": 1, "op": "status"})["result"]
        assert title(d.proc.pid) == f"qoper8d: master {d.socket}"
        for worker in status["workers"]:
            expected = f"qoper8d: worker {worker['slot']} handlers.crash:handle"
            assert title(worker["pid"]) == expected
            forkserver = int(
                Path(f"/proc/{worker['pid']}/stat").read_text().split(")")[1].split()[1]
            )
            assert title(forkserver) == "qoper8d: fork server"
