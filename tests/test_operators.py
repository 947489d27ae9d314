"""What an operator sees: failures in the logs, snapshots with rates, process titles,
reloads that keep the command line's overrides and always say how they went."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Connection, running_daemon

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
