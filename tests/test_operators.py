"""What an operator sees: failures in the logs, snapshots with rates, process titles,
reloads that keep the command line's overrides and always say how they went."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import tomli_w

from qoper8d.cli import CTL_FAILED, CTL_OK, ctl_main
from tests.harness import Connection, Daemon, Event, base_config, running_daemon

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
