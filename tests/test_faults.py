"""Faults through the real daemon, each inside the accounting harness around a live load.

Whatever a handler does to its worker, or anyone does to a worker from outside, the master
carries on, every accepted action ends exactly once with the right outcome, the good actions
around the fault all get their results, and the daemon's counters add up (tests/accounting.py).
Then the master itself: SIGKILL leaves no process behind, SIGTERM leaves no request unanswered.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qoper8d.cli import EXIT_OK, EXIT_RESTARTS
from tests.accounting import ANY, NO_RESULT, Accounting, Ledger, Line, accounting, good_action
from tests.conftest import descendants, parent_of, wait_gone
from tests.harness import Connection, Daemon, Event, base_config, running_daemon

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def books(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Accounting]:
    """A daemon (configuration sections from an indirect parameter) and its accounting."""
    sections: dict[str, dict[str, Any]] = getattr(request, "param", {})
    with running_daemon(short_tmp, **sections) as d, accounting(d) as books:
        yield books


def configured(**sections: dict[str, Any]) -> pytest.MarkDecorator:
    """Run the test's daemon with these configuration sections."""
    return pytest.mark.parametrize("books", [sections], indirect=True, ids=["configured"])


def started(d: Daemon, mode: str) -> int:
    """The pid of the worker that printed `started <mode>`: it is running that action now."""
    event = d.wait_event("worker.output", lambda e: e["line"] == f"started {mode}")
    pid: int = event["pid"]
    return pid


def exit_of(d: Daemon, pid: int) -> Event:
    """The `worker.exit` event of `pid`, once it is logged."""
    return d.wait_event("worker.exit", lambda e: e["pid"] == pid)


def replaced(books: Accounting, pid: int) -> dict[str, Any]:
    """Once `pid` is no longer in the pool and every slot serves again: the status."""
    assert wait_gone({pid}, 10) == set(), f"worker {pid} is still alive"
    status = books.wait_idle()
    pids = [w["pid"] for w in status["workers"]]
    assert pid not in pids
    assert len(pids) == status["size"]
    return status


# -- handlers that kill their own worker ---------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "detail"),
    [
        ({"mode": "exit", "code": 42}, {"exit_code": 42}),
        ({"mode": "sys_exit", "code": 3}, {"exit_code": 3}),
        ({"mode": "sigkill"}, {"signal": "SIGKILL"}),
        ({"mode": "sigsegv"}, {"signal": "SIGSEGV"}),
    ],
    ids=["os_exit", "sys_exit", "sigkill", "sigsegv"],
)
def test_a_handler_that_kills_its_worker(
    books: Accounting, action: dict[str, Any], detail: dict[str, Any]
) -> None:
    load = books.load()
    faults = books.line("faults")
    for n in range(3):
        faults.submit(n, action, codes={"worker_lost"})
        error = faults.wait(n)["error"]
        assert error.items() >= {**detail, "attempts": 1}.items(), error
        assert exit_of(books.daemon, error["pid"])["reason"] == "crash"
    books.ledger.wait_until(lambda: load.sent > 200)
    status = books.finish()
    assert status["outcomes"]["worker_lost"] == 3
    assert status["restarts"] == 3


# -- killed from outside -------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_busy_worker_killed_from_outside(books: Accounting, signum: int) -> None:
    load = books.load()
    faults = books.line("faults")
    faults.submit("hang", {"mode": "hang"}, codes={"worker_lost"})
    pid = started(books.daemon, "hang")
    os.kill(pid, signum)
    error = faults.wait("hang")["error"]
    assert error["pid"] == pid
    assert error["signal"] == signal.Signals(signum).name
    exit_event = exit_of(books.daemon, pid)
    assert exit_event["reason"] == "crash"
    assert json.loads(exit_event["doing"]) == {"mode": "hang"}
    replaced(books, pid)
    books.ledger.wait_until(lambda: load.sent > 200)
    books.finish()


def test_an_idle_worker_killed_from_outside(books: Accounting) -> None:
    load = books.load()
    books.ledger.wait_until(lambda: load.sent > 100)
    load.pause()  # every answer is in: the workers are idle
    status = books.wait_idle()
    victim = status["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    exit_event = exit_of(books.daemon, victim["pid"])
    assert exit_event["doing"] == "idle"
    assert exit_event["signal"] == "SIGKILL"
    status = replaced(books, victim["pid"])
    assert status["workers"][0]["restarts"] == victim["restarts"] + 1
    load.resume()
    sent = load.sent
    books.ledger.wait_until(lambda: load.sent > sent + 100)
    status = books.finish()
    assert status["outcomes"]["worker_lost"] == 0


@configured(pool={"kill_timeout": 0.5})
def test_a_stopped_worker_times_out_and_is_replaced(books: Accounting) -> None:
    load = books.load()
    faults = books.line("faults")
    with books.unsampled():  # see test_outcomes_add_up_while_an_answered_action_still_runs
        faults.submit("stuck", {"mode": "hang"}, codes={"timeout"}, timeout=0.5)
        pid = started(books.daemon, "hang")
        os.kill(pid, signal.SIGSTOP)
        error = faults.wait("stuck")["error"]
        assert error["code"] == "timeout"
        assert error["pid"] == pid
        exit_event = exit_of(books.daemon, pid)
    assert exit_event["reason"] == "timeout"
    assert exit_event["signal"] == "SIGKILL", "a stopped process ignores SIGTERM until killed"
    replaced(books, pid)
    books.ledger.wait_until(lambda: load.sent > 200)
    status = books.finish()
    assert status["outcomes"]["timeout"] == 1


@configured(pool={"kill_timeout": 0.5})
def test_a_handler_ignoring_sigterm_is_killed_after_its_timeout(books: Accounting) -> None:
    load = books.load()
    faults = books.line("faults")
    with books.unsampled():  # see test_outcomes_add_up_while_an_answered_action_still_runs
        faults.submit("deaf", {"mode": "ignore_term"}, codes={"timeout"}, timeout=0.3)
        pid = started(books.daemon, "ignore_term")
        assert faults.wait("deaf")["error"]["code"] == "timeout"
        exit_event = exit_of(books.daemon, pid)
    assert exit_event["signal"] == "SIGKILL"
    assert exit_event["reason"] == "timeout"
    replaced(books, pid)
    books.ledger.wait_until(lambda: load.sent > 200)
    books.finish()


# -- what a handler leaves behind ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["worker_killed", "daemon_stopped"])
def test_a_forked_grandchild_dies_with_its_worker(short_tmp: Path, how: str) -> None:
    with running_daemon(short_tmp) as d:
        with accounting(d) as books:
            load = books.load()
            faults = books.line("faults")
            faults.submit("fork", {"mode": "fork"}, result=ANY)
            grandchild = faults.wait("fork")["result"]
            assert isinstance(grandchild, int)
            worker = parent_of(grandchild)
            assert worker in {w["pid"] for w in books.status()["workers"]}
            if how == "worker_killed":
                os.kill(worker, signal.SIGKILL)
                assert wait_gone({grandchild}, 5) == set(), "the grandchild outlived its worker"
                replaced(books, worker)
            books.ledger.wait_until(lambda: load.sent > 200)
            books.finish()
        if how == "daemon_stopped":
            assert d.stop() == EXIT_OK
            assert wait_gone({grandchild}, 5) == set(), "the grandchild outlived the daemon"


def test_a_flood_of_invalid_utf8_on_stdout_and_stderr(books: Accounting) -> None:
    load = books.load()
    faults = books.line("faults")
    faults.submit_many(
        [(n, {"mode": "flood_raw", "bytes": 2 << 20}) for n in range(3)], result="flooded"
    )
    for n in range(3):
        faults.wait(n)
    books.ledger.wait_until(lambda: load.sent > 200)
    books.finish()
    d = books.daemon
    d.wait_event("worker.output", lambda e: "invalid" in e["line"])
    for line in list(d.lines):
        event = json.loads(line)  # every log line is a JSON object, whatever was printed
        assert isinstance(event, dict), line
        assert "\ufffd" not in line, f"undecodable bytes reached the log: {line[:200]}"
        if event.get("event") == "worker.output":
            assert isinstance(event["line"], str)
    flooded = [e for e in d.of("worker.output") if "invalid" in e["line"]]
    assert all("\\xff" in e["line"] for e in flooded), "invalid bytes are shown as escapes"


@configured(pool={"max_worker_rss_mb": 120})
def test_a_worker_past_its_memory_limit_is_recycled(books: Accounting) -> None:
    load = books.load()
    faults = books.line("faults")
    faults.submit("hog", {"mode": "memory", "mb": 200}, result=ANY)
    pid = faults.wait("hog")["result"]
    recycle = books.daemon.wait_event("worker.recycle", lambda e: e["pid"] == pid)
    assert "max_worker_rss_mb" in recycle["reason"]
    exit_event = exit_of(books.daemon, pid)
    assert exit_event["reason"] == "retired"
    replaced(books, pid)
    books.ledger.wait_until(lambda: load.sent > 200)
    status = books.finish()
    assert status["restarts"] == 0, "a recycled worker is not a crash"
    assert set(books.ledger.counts()) == {"result"}, "no good action failed"


@configured(pool={"poison_threshold": 3})
def test_an_action_that_kills_every_worker_ends_poisoned(
    books: Accounting, short_tmp: Path
) -> None:
    record = short_tmp / "runs"
    load = books.load()
    faults = books.line("faults")
    poison = {"mode": "sigkill", "id": "poison", "record": str(record)}
    faults.submit("poison", poison, codes={"poisoned"}, max_attempts=10)
    error = faults.wait("poison")["error"]
    assert error["code"] == "poisoned"
    assert error["attempts"] == 3
    assert error["signal"] == "SIGKILL"
    assert record.read_text().split() == ["poison"] * 3, "it ran exactly poison_threshold times"
    books.ledger.wait_until(lambda: load.sent > 200)
    status = books.finish()
    assert status["restarts"] == 3
    assert status["outcomes"]["poisoned"] == 1
    assert books.ledger.counts(["load"]) == {"result": load.sent}


def test_a_restart_storm_stops_the_daemon_and_answers_everyone(short_tmp: Path) -> None:
    # One worker: with two, see test_a_restart_storm_answers_what_runs_on_other_workers.
    config = base_config(
        short_tmp,
        pool={"size": 1},
        supervisor={"max_restarts": 3, "restart_window": 60.0, "backoff_initial": 0.0},
    )
    daemon = Daemon(short_tmp, config)
    family = descendants(daemon.proc.pid)
    ledger = Ledger()
    try:
        lines = [Line(daemon.socket, ledger, f"c{i}") for i in range(2)]
        # The worker hangs first, so that the storm starts only once everything is accepted.
        for line in lines:
            line.submit("gate", {"mode": "hang"}, codes={"cancelled"})
        started(daemon, "hang")
        for i, line in enumerate(lines):
            line.submit_many(
                [(n, {"mode": "exit", "code": 9, "n": n}) for n in range(20)],
                codes={"worker_lost", "shutting_down"},
                result=NO_RESULT,
            )
            if i == 0:  # a few good ones queued behind the storm
                line.submit_many(
                    [(f"ok{n}", good_action(n)) for n in range(5)], codes={"shutting_down"}
                )
        accepted = 2 + 20 + 5 + 20
        with Connection(daemon.socket) as watch:
            status = watch.request({"id": 1, "op": "status"})["result"]
            while status["submitted"] < accepted:  # the lines are read asynchronously
                status = watch.request({"id": 1, "op": "status"})["result"]
            assert status["submitted"] == accepted
        for line in lines:  # a cancel replaces the worker: not a crash
            line.request("open", "cancel", target="gate", result={"cancelled": True})
        assert daemon.wait(30) == EXIT_RESTARTS
        critical = daemon.wait_event("daemon.restart_intensity_exceeded")
        assert critical["level"] == "critical"
        assert "supervisor.max_restarts" in critical["error"]
        # Every accepted action was answered before the socket closed (the lines saw EOF).
        ledger.wait_until(lambda: ledger.ended == {"c0", "c1"}, timeout=10)
        assert ledger.problems() == []
        silent = {line.name: ledger.silent(line.name) for line in lines}
        assert ledger.unanswered() == 0, f"accepted, never answered: {silent}"
        # max_restarts + 1 crashes, then it gave up: the rest never ran.
        assert ledger.counts() == {"cancelled": 2, "worker_lost": 4, "shutting_down": 41}
        for line in lines:
            line.close()
    finally:
        daemon.close()
    assert wait_gone(family, 5) == set()
    assert descendants(daemon.proc.pid) == set()
    assert not daemon.socket.exists()


# -- the master itself ---------------------------------------------------------------------------


def test_sigkill_of_the_daemon_under_load_leaves_no_process(short_tmp: Path) -> None:
    config = base_config(short_tmp, pool={"size": 3})
    first = Daemon(short_tmp, config)
    try:
        with accounting(first) as books:
            load = books.load(window=96, sample_every=0)
            faults = books.line("faults")
            faults.submit("hang", {"mode": "hang"}, codes={"worker_lost"})
            started(first, "hang")
            books.ledger.wait_until(lambda: load.sent > 500)
            family = descendants(first.proc.pid)
            workers = {w["pid"] for w in books.status()["workers"]}
            assert workers < family, "the fork server is in the family too"
            first.proc.kill()
            first.proc.wait()
            assert wait_gone(family, 1.0) == set(), "processes outlived the daemon by over 1 s"
            books.ledger.wait_until(lambda: {"load", "faults"} <= books.ledger.ended)
            assert books.ledger.problems() == [], "no duplicate or wrong answers before the end"
    finally:
        first.close()
    assert first.socket.exists(), "a SIGKILLed daemon leaves its socket behind"
    with running_daemon(short_tmp, pool={"size": 3}) as second:
        second.wait_event("control.stale_socket")
        with accounting(second) as books:
            books.line("after").submit(1, good_action(1))
            books.finish()


def test_sigterm_under_load_answers_every_request_it_read(short_tmp: Path) -> None:
    with (
        running_daemon(short_tmp, pool={"size": 2, "grace_period": 10.0}) as d,
        accounting(d) as books,
    ):
        loads = [books.load(f"load{i}", codes={"shutting_down"}, sample_every=0) for i in range(3)]
        books.ledger.wait_until(lambda: all(load.sent > 300 for load in loads))
        d.signal(signal.SIGTERM)
        names = {load.line.name for load in loads}
        # Keep submitting until the daemon refuses (or is gone), then read until EOF.
        books.ledger.wait_until(
            lambda: books.ledger.counts()["shutting_down"] > 0 or names <= books.ledger.ended
        )
        for load in loads:
            load.stop()
        books.ledger.wait_until(lambda: names <= books.ledger.ended)
        assert d.wait() == EXIT_OK
        ledger = books.ledger
        assert ledger.problems() == []
        for name in names:
            # Only a tail of requests the daemon never read may be without an answer.
            silent = ledger.silent(name)
            assert silent == [], f"{name}: read but never answered: {silent[:10]}"
        seen = ledger.counts()
        assert set(seen) <= {"result", "shutting_down"}
        stopped = d.wait_event("daemon.stopped")
        assert stopped["outcomes"]["result"] == seen["result"]
        assert stopped["outcomes"]["shutting_down"] <= seen["shutting_down"]


# -- regressions: bugs this suite found, fixed -----------------------------------------------


@pytest.mark.parametrize("how", ["timed_out_worker_dying", "client_gone_action_running"])
def test_outcomes_add_up_while_an_answered_action_still_runs(short_tmp: Path, how: str) -> None:
    with running_daemon(short_tmp, pool={"kill_timeout": 2.0}) as d, Connection(d.socket) as c:
        if how == "timed_out_worker_dying":
            # It ignores SIGTERM: its worker lives kill_timeout seconds after the timeout.
            c.send({"id": 1, "op": "submit", "action": {"mode": "ignore_term"}, "timeout": 0.2})
            response = c.receive()
            assert response is not None
            assert response["error"]["code"] == "timeout"
        else:
            with Connection(d.socket) as gone:
                gone.send({"id": 1, "op": "submit", "action": {"mode": "hang"}})
                started(d, "hang")
            # The disconnect is noticed asynchronously: wait for its outcome.
            status = c.request({"id": 2, "op": "status"})["result"]
            while status["outcomes"]["cancelled"] == 0:
                status = c.request({"id": 2, "op": "status"})["result"]
        status = c.request({"id": 3, "op": "status"})["result"]
        ended = sum(status["outcomes"].values())
        assert status["submitted"] == ended + status["queued"] + status["in_flight"], status


def test_a_restart_storm_answers_what_runs_on_other_workers(short_tmp: Path) -> None:
    config = base_config(
        short_tmp,
        pool={"size": 2},
        supervisor={"max_restarts": 1, "restart_window": 60.0, "backoff_initial": 0.0},
    )
    daemon = Daemon(short_tmp, config)
    try:
        with Connection(daemon.socket) as c:
            c.send({"id": "elsewhere", "op": "submit", "action": {"mode": "hang"}})
            started(daemon, "hang")
            c.send(
                {"id": "x1", "op": "submit", "action": {"mode": "exit"}},
                {"id": "x2", "op": "submit", "action": {"mode": "exit"}},
            )
            assert daemon.wait(30) == EXIT_RESTARTS
            responses = {}
            while (response := c.receive()) is not None:
                responses[response["id"]] = response
        assert responses["x1"]["error"]["code"] == "worker_lost"
        assert responses["x2"]["error"]["code"] == "worker_lost"
        assert "elsewhere" in responses, "the action running elsewhere was never answered"
        assert responses["elsewhere"]["error"]["code"] == "shutting_down"
    finally:
        daemon.close()
