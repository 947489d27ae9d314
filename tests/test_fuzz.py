"""Bad input, generated: the daemon's socket and the configuration loader.

The socket: one daemon for the whole run, driven by a Hypothesis state machine whose every
step is something a careless or hostile client might send — random bytes, lines cut short or
dropped mid-way, lines past `server.max_message_bytes`, deeply nested JSON, wrong types in
every field, unknown ops, ids reused while in flight, and connections opened and dropped by
the hundred. After every step `status` answers on a connection of its own; at the end the
daemon is still running and its connections, trio tasks and open descriptors are back where
they started.

The configuration: any TOML-ish data either gives a `Config` or raises `ConfigError` whose
errors are single lines starting with the source's name — never any other exception.

(The daemon is started inside the one test that uses it: the autouse `no_orphans` fixture is
function-scoped, so a daemon outliving a test would fail it.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from qoper8d.config import Config, config_from_mapping, load_config
from qoper8d.control import OPS
from qoper8d.errors import ConfigError
from tests.accounting import ALL_CODES
from tests.harness import Connection, Daemon, rss_mib, running_daemon

pytestmark = pytest.mark.timeout(120)

LIMIT = 16_384  # server.max_message_bytes for the fuzzed daemon
#: Deeper than this, see test_deeply_nested_json_gets_an_error_line.
SAFE_DEPTH = 800
SENTINEL = "__sentinel__"
#: Lines answered with `"id": null` and then the connection is closed.
FATAL = {"bad_request", "too_large", "read_timeout"}

# -- JSON values -------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
ids = st.integers() | st.text(max_size=20).filter(lambda s: s != SENTINEL)
#: Values that are not a usable id.
bad_ids = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
)
#: Ops that do not change the daemon for good (drain and shutdown stop it; scale is fuzzed
#: with invalid sizes only).
SAFE_OPS = ["hello", "status", "submit", "cancel", "reload"]


def invalid_size(value: Any) -> bool:
    """Whether `value` is no size `scale` could accept (a valid one would resize the pool)."""
    valid = isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 1024
    return not (valid and float(value).is_integer())


def encode(request: Any) -> bytes:
    return json.dumps(request, allow_nan=False).encode() + b"\n"


def nested(depth: int, kind: str) -> str:
    """JSON text nested `depth` arrays or objects deep."""
    opener, closer = ("[", "]") if kind == "list" else ('{"a":', "}")
    return opener * depth + "1" + closer * depth


# -- talking to the daemon ---------------------------------------------------------------------


class PatientConnection(Connection):
    """A `Connection` whose connect waits while the daemon's listen backlog is full.

    (With a timeout set first, connect() on a Unix socket fails with EAGAIN instead, which
    is what a busy machine gives after a burst of dropped connections.) pytest-timeout is the
    deadline.
    """

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(timeout)
        self._file = self.sock.makefile("rb")


class Exchange:
    """One connection: what was sent, every response line, and whether the daemon closed it.

    After the payload come a newline (ending whatever partial line the payload left) and a
    sentinel `hello`; responses are read until the sentinel's and `expect` others have come,
    or the daemon closes the connection.
    """

    def __init__(
        self, daemon: Daemon, payload: bytes, *, expect: int = 0, sentinel: bool = True
    ) -> None:
        self.responses: list[dict[str, Any]] = []
        self.closed = False
        with PatientConnection(daemon.socket) as conn:
            tail = b"\n" + encode({"id": SENTINEL, "op": "hello"}) if sentinel else b""
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sock.sendall(payload + tail)
            seen = False
            while not (seen and len(self.answers()) >= expect):
                try:
                    line = conn._file.readline()
                except ConnectionResetError:
                    line = b""
                if not line:
                    self.closed = True
                    break
                response = json.loads(line)  # every line the daemon writes is JSON
                assert isinstance(response, dict), response
                self.responses.append(response)
                seen = seen or response.get("id") == SENTINEL
        self.check()

    def check(self) -> None:
        for response in self.responses:
            assert set(response) == {"id", "ok", "result" if response["ok"] else "error"}, response
            if response["ok"] is True:
                continue
            assert response["ok"] is False, response
            error = response["error"]
            assert error["code"] in ALL_CODES, response
            assert isinstance(error["message"], str), response
            assert error["message"], response
        if self.closed and self.responses:
            # A connection is closed only after one error line with "id": null.
            last = self.responses[-1]
            assert last["id"] is None, f"closed without a final error line: {self.responses}"
            assert last["error"]["code"] in FATAL, self.responses
        sentinels = [r for r in self.responses if r.get("id") == SENTINEL]
        if not self.closed:
            assert len(sentinels) == 1, self.responses
        assert all(r["ok"] is True for r in sentinels), sentinels

    def answers(self) -> list[dict[str, Any]]:
        return [r for r in self.responses if r.get("id") != SENTINEL]

    def fatal(self) -> str:
        """The code of the error line that closed the connection."""
        assert self.closed, self.responses
        assert self.responses, "closed without an error line"
        last = self.responses[-1]
        assert last["id"] is None
        code: str = last["error"]["code"]
        return code


def usable(request: dict[str, Any]) -> bool:
    """Whether the request's id can be echoed: an integer (of any size) or a string."""
    key = request.get("id")
    return isinstance(key, int | str) and not isinstance(key, bool)


def drop(daemon: Daemon, payloads: list[bytes]) -> None:
    """Open a connection per payload, send it, and close without reading a thing."""
    socks = []
    try:
        for payload in payloads:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            # Blocking, so a full listen backlog makes us wait instead of failing (EAGAIN);
            # pytest-timeout is the deadline.
            sock.connect(str(daemon.socket))
            sock.settimeout(10)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
    finally:
        for sock in socks:
            sock.close()


def leak_indicators(status: dict[str, Any]) -> dict[str, int]:
    daemon = status["daemon"]
    return {k: daemon[k] for k in ("connections", "tasks", "open_fds", "unsent_bytes")}


class ProtocolFuzz(RuleBasedStateMachine):
    daemon: ClassVar[Daemon]
    watch: ClassVar[Connection]
    steps: ClassVar[list[int]]
    baseline: ClassVar[dict[str, int]]

    # -- garbage -------------------------------------------------------------------------

    @rule(data=st.binary(max_size=3000))
    def random_bytes(self, data: bytes) -> None:
        Exchange(self.daemon, data)

    @rule(
        text=st.text(
            alphabet=st.sampled_from('{}[]":,0123456789.eE+-truefalsnl \\\t\n' + "idopsubmitacn"),
            max_size=300,
        )
    )
    def json_ish_text(self, text: str) -> None:
        Exchange(self.daemon, text.encode())

    @rule(
        request=st.fixed_dictionaries({"id": ids, "op": st.sampled_from(SAFE_OPS)}), data=st.data()
    )
    def truncated_line(self, request: dict[str, Any], data: st.DataObject) -> None:
        line = encode({**request, "action": 1})[:-1]
        cut = data.draw(st.integers(min_value=1, max_value=len(line) - 1))
        exchange = Exchange(self.daemon, line[:cut])  # the newline comes early
        assert exchange.fatal() == "bad_request"

    @rule(size=st.integers(min_value=LIMIT + 1, max_value=4 * LIMIT), newline=st.booleans())
    def huge_line(self, size: int, newline: bool) -> None:
        head = b'{"id": 1, "op": "submit", "action": "'
        line = head + b"x" * (size - len(head) - 2) + b'"}'
        exchange = Exchange(self.daemon, line + (b"\n" if newline else b""), sentinel=newline)
        assert exchange.fatal() == "too_large"

    @rule(
        depth=st.integers(min_value=1, max_value=SAFE_DEPTH),
        kind=st.sampled_from(["list", "object"]),
        where=st.sampled_from(["action", "id", "unbalanced"]),
    )
    def deep_nesting(self, depth: int, kind: str, where: str) -> None:
        value = nested(depth, kind)
        if where == "action":
            line = f'{{"id": "deep", "op": "submit", "action": {value}}}'
        elif where == "id":
            line = f'{{"id": {value}, "op": "status"}}'
        else:
            line = f'{{"id": 1, "op": "submit", "action": {value[:-1]}}}'
        exchange = Exchange(self.daemon, line.encode() + b"\n", expect=where != "unbalanced")
        if where == "action":
            (answer,) = exchange.answers()
            assert answer == {"id": "deep", "ok": True, "result": json.loads(value)}
        elif where == "id":
            (answer,) = exchange.answers()
            assert answer["id"] is None
            assert answer["error"]["code"] == "bad_request"
            assert not exchange.closed, "a JSON line with a bad id answers, and carries on"
        else:
            assert exchange.fatal() == "bad_request"

    # -- well-formed but wrong -----------------------------------------------------------

    @rule(op=st.sampled_from([*SAFE_OPS, "scale"]), data=st.data())
    def wrong_types(self, op: str, data: st.DataObject) -> None:
        request: dict[str, Any] = {"id": data.draw(ids), "op": op}
        fields = {"submit": ["action", "timeout", "max_attempts"], "cancel": ["target"]}
        for name in fields.get(op, []):
            request[name] = data.draw(json_values, label=name)
        if op == "scale":
            request["size"] = data.draw(json_values.filter(invalid_size), label="size")
        if data.draw(st.booleans(), label="bad id"):
            request["id"] = data.draw(bad_ids, label="id")
        if data.draw(st.booleans(), label="drop a field"):
            request.pop(data.draw(st.sampled_from(sorted(request))), None)
        exchange = Exchange(self.daemon, encode(request), expect=1)
        assert not exchange.closed, f"a JSON object never closes a connection: {exchange.responses}"
        (answer,) = exchange.answers()
        if usable(request):
            assert answer["id"] == request["id"]
        else:
            assert answer["ok"] is False, answer
            assert answer["error"]["code"] == "bad_request", answer
        if answer["ok"] and op == "submit":
            assert answer["result"] == request["action"]
        if op == "scale":
            assert answer["ok"] is False, answer
            assert answer["error"]["code"] == "bad_request", answer

    @rule(key=ids, op=st.text(max_size=20).filter(lambda s: s not in OPS))
    def unknown_op(self, key: int | str, op: str) -> None:
        exchange = Exchange(self.daemon, encode({"id": key, "op": op}), expect=1)
        (answer,) = exchange.answers()
        assert answer["id"] == key
        assert answer["error"]["code"] == "unknown_op"

    @rule(key=ids, actions=st.lists(json_values, min_size=2, max_size=5))
    def id_reused_while_in_flight(self, key: int | str, actions: list[Any]) -> None:
        payload = b"".join(encode({"id": key, "op": "submit", "action": a}) for a in actions)
        exchange = Exchange(self.daemon, payload, expect=len(actions))
        answers = exchange.answers()
        assert all(a["id"] == key for a in answers)
        results = [a for a in answers if a["ok"]]
        refused = [a for a in answers if not a["ok"]]
        # Sent in one write, the first is still in flight when the others are read.
        assert len(results) == 1, answers
        assert results[0]["result"] == actions[0]
        assert len(refused) == len(actions) - 1
        assert all(a["error"]["code"] == "bad_request" for a in refused)

    # -- connections ---------------------------------------------------------------------

    @rule(
        count=st.integers(min_value=1, max_value=200),
        partial=st.binary(min_size=1, max_size=200).filter(lambda b: b"\n" not in b),
    )
    def dropped_mid_line(self, count: int, partial: bytes) -> None:
        drop(self.daemon, [partial] * count)

    @rule(actions=st.lists(json_values, min_size=1, max_size=20))
    def dropped_with_work_queued(self, actions: list[Any]) -> None:
        lines = [encode({"id": n, "op": "submit", "action": a}) for n, a in enumerate(actions)]
        drop(self.daemon, [b"".join(lines)])

    # -- well-formed, split and interleaved -------------------------------------------------

    @rule(
        actions=st.lists(json_values, min_size=1, max_size=30),
        cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=12),
        half_close=st.booleans(),
    )
    def fragments(self, actions: list[Any], cuts: list[int], half_close: bool) -> None:
        """Requests cut at arbitrary bytes across writes (and perhaps a half-close after
        them): each submit is answered exactly once, with its action; then, after a
        half-close, end-of-file."""
        data = b"".join(
            encode({"id": n, "op": "submit", "action": a}) for n, a in enumerate(actions)
        )
        with PatientConnection(self.daemon.socket) as conn:
            start = 0
            for cut in sorted({min(c, len(data)) for c in cuts}):
                conn.sock.sendall(data[start:cut])
                start = cut
            conn.sock.sendall(data[start:])
            if half_close:
                conn.sock.shutdown(socket.SHUT_WR)
            answers = [conn.receive() for _ in actions]
            if half_close:
                assert conn.receive() is None, "end-of-file once every answer is written"
        assert sorted(a["id"] for a in answers if a) == list(range(len(actions)))
        for answer in answers:
            assert answer is not None
            assert answer == {"id": answer["id"], "ok": True, "result": actions[answer["id"]]}

    @rule(
        plans=st.lists(
            st.lists(st.tuples(json_values, st.booleans()), min_size=1, max_size=10),
            min_size=2,
            max_size=5,
        ),
        order=st.randoms(use_true_random=False),
    )
    def interleaved(self, plans: list[list[tuple[Any, bool]]], order: Any) -> None:
        """Several connections at once, their submits (some cancelled at once) sent in a
        shuffled interleaving: every submit gets exactly one answer on its own connection, a
        result or `cancelled`, and every cancel one answer too."""
        conns = [PatientConnection(self.daemon.socket) for _ in plans]
        try:
            sends = []
            for c, plan in enumerate(plans):
                for n, (action, cancel) in enumerate(plan):
                    sends.append((c, encode({"id": n, "op": "submit", "action": action})))
                    if cancel:
                        sends.append((c, encode({"id": f"c{n}", "op": "cancel", "target": n})))
            # Shuffle across connections; each connection keeps its own order.
            slots = [c for c, _ in sends]
            order.shuffle(slots)
            queues: list[list[bytes]] = [
                [line for c2, line in sends if c2 == c] for c in range(len(plans))
            ]
            for c in slots:
                conns[c].sock.sendall(queues[c].pop(0))
            for c, plan in enumerate(plans):
                expected = len(plan) + sum(cancel for _, cancel in plan)
                got = conns[c].receive_all(expected)
                by_id: dict[Any, list[dict[str, Any]]] = {}
                for answer in got:
                    by_id.setdefault(answer["id"], []).append(answer)
                assert all(len(v) == 1 for v in by_id.values()), got
                for n, (action, cancel) in enumerate(plan):
                    (answer,) = by_id[n]
                    if answer["ok"]:
                        assert answer["result"] == action
                    else:
                        assert cancel, answer
                        assert answer["error"]["code"] == "cancelled", answer
                    if cancel:
                        assert by_id[f"c{n}"][0]["ok"] is True
        finally:
            for conn in conns:
                conn.close()

    @rule(
        value=st.sampled_from([b"1e400", b"-1e999", b"[1, 2e308]", b"1" * 4400, b'{"a": 1e400}']),
        id_=st.integers(0, 10),
    )
    def unholdable(self, value: bytes, id_: int) -> None:
        """JSON a worker could not hold: refused as a bad request; the connection carries on."""
        line = b'{"id": %d, "op": "submit", "action": %b}\n' % (id_, value)
        exchange = Exchange(self.daemon, line, expect=1)
        assert not exchange.closed, exchange.responses
        (answer,) = exchange.answers()
        assert answer["error"]["code"] == "bad_request", answer

    @rule(data=st.binary(min_size=1, max_size=50), where=st.sampled_from(["action", "id", "op"]))
    def not_utf8(self, data: bytes, where: str) -> None:
        """Invalid UTF-8 anywhere is not JSON: one error line and the connection closes."""
        bad = b"\xff" + data.replace(b'"', b"").replace(b"\\", b"").replace(b"\n", b"")
        fields = {
            "action": b'{"id": 1, "op": "submit", "action": "%b"}',
            "id": b'{"id": "%b", "op": "hello"}',
            "op": b'{"id": 1, "op": "%b"}',
        }
        exchange = Exchange(self.daemon, fields[where] % bad + b"\n")
        assert exchange.fatal() == "bad_request"

    @invariant()
    def status_answers(self) -> None:
        self.steps.append(1)
        status = self.watch.request({"id": "watch", "op": "status"})
        assert status["ok"] is True, status
        assert status["result"]["state"] == "running"
        assert self.daemon.proc.poll() is None

    @invariant()
    def nothing_held(self) -> None:
        """Once a step's connections are closed, what they made the daemon hold is gone:
        connections, tasks, descriptors, queued and unsent bytes back at the baseline."""
        deadline = time.monotonic() + 15
        while True:
            status = self.watch.request({"id": "held", "op": "status"})["result"]
            now = {**leak_indicators(status), "queued_bytes": status["queued_bytes"]}
            if now == self.baseline:
                return
            assert time.monotonic() < deadline, f"held: {self.baseline} -> {now}"


@pytest.mark.slow
# Its 120 examples take about 40 s on two idle cores and three times that on busy ones: this
# deadline catches a hang, not a slow machine.
@pytest.mark.timeout(360)
def test_the_daemon_survives_whatever_clients_send(short_tmp: Path) -> None:
    with (
        running_daemon(
            short_tmp,
            pool={"handler": "handlers.echo:handle"},
            server={"max_message_bytes": LIMIT, "max_connections": 512},
        ) as d,
        Connection(d.socket) as watch,
    ):
        first = watch.request({"id": 0, "op": "status"})["result"]
        baseline = leak_indicators(first)

        class Machine(ProtocolFuzz):
            daemon = d
            steps: ClassVar[list[int]] = []

        Machine.watch = watch
        Machine.baseline = {**baseline, "queued_bytes": first["queued_bytes"]}
        started = time.monotonic()
        # In rounds, so that the daemon's memory can be compared from round to round.
        rss = []
        for _ in range(3):
            run_state_machine_as_test(
                Machine,
                settings=settings(
                    max_examples=40,
                    stateful_step_count=20,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    database=None,
                ),
            )
            rss.append(rss_mib(d.proc.pid))
        # glibc keeps freed memory for reuse, so RSS need not fall back; it must not grow
        # round after round.
        assert rss[2] - rss[1] < 16, f"daemon RSS by round: {rss} MiB"
        # Thousands of connections opened and dropped mid-line, on top.
        for _ in range(8):
            drop(d, [b'{"id": 1, "op": "sta'] * 250)
        # The disconnects are noticed asynchronously: re-query until settled, or fail.
        deadline = time.monotonic() + 15
        while True:
            now = leak_indicators(watch.request({"id": 1, "op": "status"})["result"])
            if now == baseline:
                break
            assert time.monotonic() < deadline, f"leaked: {baseline} -> {now}"
        status = watch.request({"id": 2, "op": "status"})["result"]
        assert status["state"] == "running"
        assert all(w["pid"] is not None for w in status["workers"])
        print(
            f"\nfuzz: {len(Machine.steps)} steps in {time.monotonic() - started:.1f} s, {now}, "
            f"RSS by round {rss} MiB"
        )
    assert d.proc.returncode == 0


@pytest.mark.parametrize("where", ["action", "id"])
def test_deeply_nested_json_gets_an_error_line(short_tmp: Path, where: str) -> None:
    with (
        running_daemon(short_tmp, pool={"handler": "handlers.echo:handle"}) as d,
        Connection(d.socket) as bystander,
        Connection(d.socket) as c,
    ):
        value = nested(5000, "list")
        if where == "action":
            c.send(f'{{"id": 1, "op": "submit", "action": {value}}}\n'.encode())
        else:
            c.send(f'{{"id": {value}, "op": "status"}}\n'.encode())
        response = c.receive()
        assert response is not None, "no answer: the connection was dropped"
        assert response["ok"] is False
        assert bystander.request({"id": 1, "op": "status"})["ok"] is True


def test_a_client_closing_with_unread_answers_leaves_the_daemon_serving(
    short_tmp: Path,
) -> None:
    with running_daemon(short_tmp) as d, Connection(d.socket) as bystander:
        rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rude.settimeout(10)
        rude.connect(str(d.socket))
        rude.sendall(b'{"id": 1, "op": "hello"}\n')
        rude.recv(1, socket.MSG_PEEK)  # the answer has arrived; leave it unread
        rude.close()  # Linux gives the daemon ECONNRESET instead of end-of-file
        # Once the daemon has dealt with it, only the bystander is left.
        deadline = time.monotonic() + 10
        status = bystander.request({"id": 1, "op": "status"})["result"]
        while status["daemon"]["connections"] != 1:
            assert time.monotonic() < deadline, status["daemon"]
            status = bystander.request({"id": 1, "op": "status"})["result"]
        assert status["state"] == "running"
        assert d.proc.poll() is None


# -- configuration ---------------------------------------------------------------------------------

SECTIONS: dict[str, list[str]] = {
    name: list(section.__struct_fields__)
    for name, section in ((n, type(getattr(Config(), n))) for n in Config.__struct_fields__)
}

#: Keys that a terminal shows on one line (see test_a_section_name_with_a_newline...).
one_line_text = st.text(max_size=12).filter(lambda s: "\n" not in s and "\r" not in s)
toml_scalars = (
    st.booleans()
    | st.integers()
    | st.integers(min_value=-5, max_value=2000)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["handlers.echo:handle", "trio", "json", "forkserver", "x:y", ""])
    | st.datetimes()
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        name = draw(st.sampled_from(sorted(SECTIONS)) | one_line_text)
        if name in SECTIONS and draw(st.integers(0, 9)):
            keys = st.sampled_from(SECTIONS[name]) | st.text(max_size=10)
            document[name] = draw(st.dictionaries(keys, toml_values, max_size=6))
        else:
            document[name] = draw(toml_values)
    return document


def check_outcome(load: Any, source: str) -> None:
    """`load()` gives a Config, or raises a ConfigError of one-line errors naming `source`."""
    try:
        config = load()
    except ConfigError as exc:
        errors = exc.details.get("errors")
    else:
        assert isinstance(config, Config)
        return
    assert isinstance(errors, list)
    assert errors, "a ConfigError names at least one problem"
    for line in errors:
        assert isinstance(line, str)
        assert line.startswith(f"{source}: "), line
        assert "\n" not in line, f"not a single line: {line!r}"
        assert "\r" not in line, f"not a single line: {line!r}"


@settings(max_examples=400, deadline=None)
@given(
    document=config_documents()
    | toml_scalars
    | st.lists(toml_values, max_size=3)
    | st.dictionaries(one_line_text, toml_values, max_size=4)
)
def test_config_from_mapping_accepts_or_explains(document: Any) -> None:
    check_outcome(lambda: config_from_mapping(document, "fuzz.toml"), "fuzz.toml")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=config_documents(), data=st.data())
def test_load_config_accepts_or_explains(
    document: dict[str, Any], data: st.DataObject, tmp_path: Path
) -> None:
    text = tomli_w.dumps(document).encode()
    how = data.draw(st.sampled_from(["as is", "cut", "spliced", "bytes", "text"]))
    if how == "cut" and text:
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif how == "spliced":
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.binary(max_size=20)) + text[at:]
    elif how == "bytes":
        text = data.draw(st.binary(max_size=200))
    elif how == "text":
        alphabet = st.sampled_from(string.printable + "[]=\"'.ü\u2028")
        text = data.draw(st.text(alphabet, max_size=200)).encode()
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text)
    check_outcome(lambda: load_config(path), str(path))


@pytest.mark.parametrize("document", ['["a\\nb"]\n', '"a\\nb" = 1\n', '"\\r" = false\n'])
def test_a_section_name_with_a_newline_gives_a_one_line_error(
    tmp_path: Path, document: str
) -> None:
    path = tmp_path / "odd.toml"
    path.write_text(document)
    check_outcome(lambda: load_config(path), str(path))


def test_a_missing_directory_or_unreadable_config_is_explained(tmp_path: Path) -> None:
    check_outcome(lambda: load_config(tmp_path / "missing.toml"), str(tmp_path / "missing.toml"))
    check_outcome(lambda: load_config(tmp_path), str(tmp_path))
    if os.geteuid() != 0:  # root reads anything
        path = tmp_path / "secret.toml"
        path.write_text("")
        path.chmod(0)
        check_outcome(lambda: load_config(path), str(path))
