"""The clients' sans-IO protocol (`qoper8d._protocol`, `qoper8d._ops`) fed bytes by hand: the
lines it sends, responses matched in any order, a map's window, order and abandonment, and
how a connection ends. No daemon and no socket: whatever both clients decide is decided
here, so it is tested here once; the clients' I/O is tested against a real daemon in
test_client.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from qoper8d import _ops
from qoper8d._protocol import ClientProtocol, FixedWindow, MapRun
from qoper8d._window import Observed
from qoper8d.errors import ConnectError, Forbidden, HandlerError, NotRunning, WorkerLost

PATH = Path("/run/q8/test.sock")


def protocol() -> ClientProtocol:
    return ClientProtocol(PATH, itertools.count(1))


def sent(p: ClientProtocol) -> list[dict[str, Any]]:
    """What `p` would send now, decoded, taken out of its buffer."""
    return [json.loads(line) for line in p.data_to_send().splitlines()]


def answer(rid: int, result: Any = None, error: dict[str, Any] | None = None) -> bytes:
    if error is not None:
        return json.dumps({"id": rid, "ok": False, "error": error}).encode() + b"\n"
    return json.dumps({"id": rid, "ok": True, "result": result}).encode() + b"\n"


def test_each_op_sends_its_line_and_reads_its_result() -> None:
    p = protocol()
    calls: list[tuple[_ops.Request[Any], dict[str, Any], Any, Any]] = [
        (_ops.hello(), {"op": "hello"}, {"protocol": 1}, {"protocol": 1}),
        (_ops.status(), {"op": "status"}, {"state": "running"}, {"state": "running"}),
        (_ops.scale(3), {"op": "scale", "size": 3}, {"size": 3}, {"size": 3}),
        (_ops.cancel(7), {"op": "cancel", "target": 7}, {"cancelled": True}, True),
        (
            _ops.reload(),
            {"op": "reload"},
            {"changed": ["pool.size: 2 -> 3"]},
            ["pool.size: 2 -> 3"],
        ),
        (_ops.drain(), {"op": "drain"}, {}, None),
        (_ops.shutdown(None), {"op": "shutdown"}, {}, None),
        (_ops.shutdown(2), {"op": "shutdown", "grace": 2.0}, {}, None),
        (_ops.submit({"x": 1}, None, None), {"op": "submit", "action": {"x": 1}}, 2, 2),
        (
            _ops.submit([1], 0.5, 2),
            {"op": "submit", "timeout": 0.5, "max_attempts": 2, "action": [1]},
            None,
            None,
        ),
    ]
    ids = [p.send(body) for (_, body), *_ in calls]
    assert ids == list(range(1, len(calls) + 1))  # from the client's counter
    assert sent(p) == [{"id": rid, **line} for rid, (_, line, *_) in zip(ids, calls, strict=True)]
    # Answered in reverse order, all in one read: each is matched by its id.
    p.receive_data(
        b"".join(
            answer(rid, wire)
            for rid, (_, _, wire, _) in reversed(list(zip(ids, calls, strict=True)))
        )
    )
    for rid, ((op, _), _, _, value) in zip(ids, calls, strict=True):
        assert p.outcome(rid, op) == value
    assert p.responses == {}


def test_which_ops_the_timeout_bounds_and_which_give_ups_cancel() -> None:
    requests: dict[str, _ops.Request[Any]] = {
        "hello": _ops.hello(),
        "submit": _ops.submit({}, None, None),
        "cancel": _ops.cancel(1),
        "status": _ops.status(),
        "scale": _ops.scale(1),
        "reload": _ops.reload(),
        "drain": _ops.drain(),
        "shutdown": _ops.shutdown(None),
    }
    # The daemon answers these by itself; the others wait for actions.
    assert {name for name, (op, _) in requests.items() if op.bounded} == {
        "hello",
        "cancel",
        "status",
        "scale",
        "shutdown",
    }
    assert {name for name, (op, _) in requests.items() if op.cancels} == {"submit"}


def test_an_error_response_becomes_its_exception() -> None:
    p = protocol()
    op, body = _ops.submit({"mode": "raise"}, None, None)
    rid = p.send(body)
    error = {"code": "worker_lost", "message": "gone", "pid": 12, "signal": "SIGKILL"}
    p.receive_data(answer(rid, error=error))
    with pytest.raises(WorkerLost) as raised:
        p.outcome(rid, op)
    assert raised.value.signal == "SIGKILL"


def test_responses_nobody_waits_for_are_dropped_and_lines_may_come_in_pieces() -> None:
    p = protocol()
    rid = p.send(_ops.status()[1])
    data = answer(999, 1) + answer(rid, {"state": "running"})
    for i in range(len(data)):  # a byte at a time
        p.receive_data(data[i : i + 1])
    assert set(p.responses) == {rid}


def test_giving_up_cancels_only_what_is_unanswered_and_only_when_asked() -> None:
    p = protocol()
    submits = [p.send(_ops.submit(i, None, None)[1]) for i in range(3)]
    status = p.send(_ops.status()[1])
    p.data_to_send()
    p.receive_data(answer(submits[1], 1))
    assert p.give_up([status], cancel=False) is False  # a timed-out status: just forgotten
    assert p.give_up(submits, cancel=True) is True
    cancels = sent(p)
    assert [c["target"] for c in cancels] == [submits[0], submits[2]]
    assert all(c["op"] == "cancel" and c["id"] > status for c in cancels)
    assert p.responses == {}
    # Their answers, when they come, are dropped, as are the cancels'.
    p.receive_data(b"".join(answer(rid) for rid in [*submits, status, *(c["id"] for c in cancels)]))
    assert p.responses == {}
    assert p.give_up(submits, cancel=True) is False


def test_partial_writes() -> None:
    p = protocol()
    for i in range(3):
        p.send(_ops.submit(i, None, None)[1])
    lines = list(p.out)
    p.written(len(lines[0]) + 3)
    assert (p.out, p.sent) == (lines[1:], 3)
    p.written(len(lines[1]) - 3)
    assert (p.out, p.sent) == (lines[2:], 0)
    p.written(5)
    assert p.data_to_send() == lines[2][5:]
    assert (p.out, p.sent) == ([], 0)


def test_how_a_connection_ends() -> None:
    p = protocol()
    op, body = _ops.status()
    rid = p.send(body)
    answered = p.send(body)
    p.receive_data(answer(answered, {"state": "running"}))
    p.receive_data(b"")
    assert isinstance(p.failure, NotRunning)
    assert "closed the connection before answering" in p.failure.message
    assert p.outcome(answered, op) == {"state": "running"}  # what came before still counts
    assert p.give_up([rid], cancel=True) is False  # no cancel for a connection that is gone
    with pytest.raises(NotRunning) as again:
        p.send(body)
    assert again.value is not p.failure  # a fresh copy each time it is raised

    refused = protocol()
    refused.send(body)
    refused.cannot_send()  # the daemon hung up on us...
    assert refused.out == []
    refused.receive_data(b'{"id": null, "ok": false, "error": {"code": "forbidden",')
    refused.receive_data(b' "message": "uid 65534 may not connect"}}\n')
    refused.receive_data(b"")  # ...and its last words are why
    assert isinstance(refused.failure, Forbidden)

    closing = protocol()
    closing.closing = True
    closing.receive_data(b"")
    assert type(closing.failure) is ConnectError
    assert closing.failure.message == "the client is closed"

    garbled = protocol()
    garbled.receive_data(b"not json\n")
    assert isinstance(garbled.failure, ConnectError)
    assert "unreadable response" in garbled.failure.message


# -- map ---------------------------------------------------------------------------------------


def test_a_map_keeps_its_window_and_its_order() -> None:
    p = protocol()
    run = MapRun(FixedWindow(3), False, None, None)
    run.start(p)
    source = iter(range(10))
    results = []
    in_flight = []
    while (head := run.fill(source)) is not None:
        in_flight.append(len(run.pending))
        # Answer what was just sent, last first; the head may not be among them.
        lines = sent(p)
        p.receive_data(b"".join(answer(line["id"], line["action"] * 10) for line in lines[::-1]))
        assert head in p.responses
        results.append(run.take())
    assert in_flight == [3] * 8 + [2, 1]  # full until the source runs out
    assert results == [i * 10 for i in range(10)]
    assert run.abandon() is False


def test_a_map_window_of_one_reads_the_source_only_after_each_result() -> None:
    p = protocol()
    run = MapRun(FixedWindow(1), False, None, None)
    run.start(p)
    read = []

    def source() -> Any:
        for i in range(3):
            read.append(i)
            yield i

    actions = source()
    for i in range(3):
        head = run.fill(actions)
        assert read == list(range(i + 1))
        assert head is not None
        p.receive_data(answer(head, i))
        assert run.take() == i
    assert run.fill(actions) is None


def test_map_errors_are_raised_or_returned_in_place() -> None:
    failing = {"code": "handler_error", "message": "boom", "type": "ValueError"}
    for return_exceptions in (True, False):
        p = protocol()
        run = MapRun(FixedWindow(8), return_exceptions, 1.5, None)
        run.start(p)
        head = run.fill(iter("ab"))
        lines = sent(p)
        assert [line.get("timeout") for line in lines] == [1.5, 1.5]
        assert head == lines[0]["id"]
        p.receive_data(answer(lines[0]["id"], error=failing) + answer(lines[1]["id"], "b"))
        if return_exceptions:
            assert isinstance(run.take(), HandlerError)
            assert run.take() == "b"
        else:
            with pytest.raises(HandlerError, match="boom"):
                run.take()


def test_leaving_a_map_early_cancels_whatever_is_outstanding() -> None:
    p = protocol()
    run = MapRun(FixedWindow(4), False, None, None)
    run.start(p)
    run.fill(iter(range(100)))
    lines = sent(p)
    p.receive_data(answer(lines[0]["id"], 0) + answer(lines[2]["id"], 2))
    assert run.take() == 0
    assert run.abandon() is True  # the caller broke out of the loop
    assert [c["target"] for c in sent(p)] == [lines[1]["id"], lines[3]["id"]]
    assert p.responses == {}


def test_a_map_whose_connection_is_lost_yields_what_came_and_then_raises() -> None:
    p = protocol()
    run = MapRun(FixedWindow(2), False, None, None)
    run.start(p)
    source = iter(range(10))
    first = run.fill(source)
    assert first is not None
    p.receive_data(answer(first, "first"))
    p.receive_data(b"")
    assert run.take() == "first"
    # Nothing more is taken from the source; the one in flight is next, and never comes
    # (the client's wait for it raises the connection's failure).
    head = run.fill(source)
    assert head is not None
    assert head not in p.responses
    assert next(source) == 2

    # Lost with nothing in flight and actions still to come: the map raises at once.
    lost = protocol()
    lost.receive_data(b"")
    run = MapRun(FixedWindow(2), False, None, None)
    run.start(lost)
    with pytest.raises(NotRunning):
        run.fill(source)
    assert next(source) == 3


def test_windows() -> None:
    assert FixedWindow(4).limit == 4
    with pytest.raises(ValueError, match="window must be at least 1"):
        FixedWindow(0)

    class Stalled:
        limit = 0
        first = 0

        def learn(self, observed: Observed) -> int:
            raise AssertionError("a window with first = 0 is never asked to learn")

    # A window that allows none with nothing in flight would end the map early; it gets 1.
    p = protocol()
    run = MapRun(Stalled(), False, None, None)
    run.start(p)
    assert run.room() == 1
    assert run.fill(iter("xy")) is not None
    assert len(run.pending) == 1
    assert run.room() == 0
    # A window may change its mind between rounds.
    grown = Stalled()
    run = MapRun(grown, False, None, None)
    run.start(p)
    run.fill(iter(range(10)))
    grown.limit = 3
    run.fill(iter(range(10)))
    assert len(run.pending) == 3
