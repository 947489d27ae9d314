"""Accounting for fault tests: every accepted action ends exactly once, and the daemon agrees.

A `Ledger` remembers every `submit` a test sends (which connection, which id, what may come
back) and every response that arrives. `Line` is a raw NDJSON `Connection` whose responses
are read by a thread straight into the ledger, so a test can inject faults from its own
thread while answers keep flowing. `Load` keeps a window of good actions in flight on a line
of its own, and checks the daemon's `status` counters between chunks.

At the end `Accounting.finish()` stops the loads, waits (with a deadline) for every answer,
waits for the daemon to be idle, and asserts:

* every submitted id got exactly one response, on its own connection, and nothing else came;
* results are right (a good action's result is the action itself, its `id` included), and
  each error carries a code the request allowed, with a message;
* at every status sample, `submitted == sum(outcomes) + queued + in_flight`; once idle,
  `submitted == sum(outcomes)`, and the outcome counts (since the baseline) are exactly the
  ones the clients saw.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qoper8d.stats import OUTCOMES
from tests.harness import Connection, Daemon

#: Codes an accepted action can end with (besides a result).
ACTION_CODES = frozenset(OUTCOMES) - {"result"}
#: Codes that refuse a request before anything was accepted.
REFUSAL_CODES = frozenset(
    {
        "bad_request",
        "unknown_op",
        "too_large",
        "queue_full",
        "forbidden",
        "too_many_connections",
        "read_timeout",
        "config_error",
    }
)
ALL_CODES = ACTION_CODES | REFUSAL_CODES

Key = int | str
Response = dict[str, Any]


class _Same:
    """The expected result is the action itself."""

    def __repr__(self) -> str:
        return "SAME"


class _Anything:
    """Any result is acceptable."""

    def __repr__(self) -> str:
        return "ANY"


SAME = _Same()
ANY = _Anything()
#: A result nobody may get: the request must end with one of its error codes.
NO_RESULT = object()


@dataclass
class Expected:
    """What one submit may end with."""

    action: Any
    result: Any
    codes: frozenset[str]
    #: A submit (its outcome is one the daemon counts), not another op.
    submit: bool = True
    answers: list[Response] = field(default_factory=list)


def good_action(n: int) -> dict[str, Any]:
    """An action for `handlers.crash:handle` that comes back as its own result."""
    return {"mode": "ok", "id": n}


def outcome_of(response: Response) -> str:
    """ "result", or the response's error code."""
    if response.get("ok") is True:
        return "result"
    return str(response.get("error", {}).get("code"))


class Ledger:
    """Every submit and every response, across connections and threads."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.expected: dict[tuple[str, Key], Expected] = {}
        #: Submits per connection, in the order they were sent.
        self.order: dict[str, list[Key]] = {}
        #: Responses that match no submit on their connection.
        self.strays: list[tuple[str, Response]] = []
        #: Connections that reached end-of-file.
        self.ended: set[str] = set()
        #: Broken invariants seen in status samples.
        self.violations: list[str] = []
        self.samples = 0
        self._unanswered: Counter[str] = Counter()

    # -- recording -----------------------------------------------------------------------

    def expect(
        self,
        conn: str,
        key: Key,
        action: Any,
        result: Any,
        codes: Iterable[str],
        *,
        submit: bool = True,
    ) -> None:
        codes = frozenset(codes)
        unknown = codes - ALL_CODES
        assert not unknown, f"not protocol codes: {sorted(unknown)}"
        with self.changed:
            assert (conn, key) not in self.expected, f"id {key!r} used twice on {conn}"
            self.expected[conn, key] = Expected(action, result, codes, submit)
            self.order.setdefault(conn, []).append(key)
            self._unanswered[conn] += 1

    def record(self, conn: str, response: Response) -> None:
        with self.changed:
            key = response.get("id")
            entry = self.expected.get((conn, key)) if isinstance(key, int | str) else None
            if entry is None:
                self.strays.append((conn, response))
            else:
                if not entry.answers:
                    self._unanswered[conn] -= 1
                entry.answers.append(response)
            self.changed.notify_all()

    def end(self, conn: str) -> None:
        with self.changed:
            self.ended.add(conn)
            self.changed.notify_all()

    # -- waiting -------------------------------------------------------------------------

    def unanswered(self, conn: str | None = None) -> int:
        with self.changed:
            if conn is None:
                return sum(self._unanswered.values())
            return self._unanswered[conn]

    def wait_for(self, conn: str, key: Key, timeout: float = 20.0) -> Response:
        """The first response to `key` on `conn`, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        with self.changed:
            entry = self.expected[conn, key]
            while not entry.answers:
                left = deadline - time.monotonic()
                assert left > 0, f"no response to {key!r} on {conn} within {timeout} s"
                assert conn not in self.ended, f"{conn} closed before {key!r} was answered"
                self.changed.wait(left)
            return entry.answers[0]

    def wait_answered(self, conns: Iterable[str] | None = None, timeout: float = 30.0) -> None:
        """Until every submit (on `conns`, default all) has its response."""
        deadline = time.monotonic() + timeout
        with self.changed:
            names = list(self.order) if conns is None else list(conns)
            while True:
                left_over = {c: self._unanswered[c] for c in names if self._unanswered[c]}
                if not left_over:
                    return
                left = deadline - time.monotonic()
                closed = [c for c in left_over if c in self.ended]
                assert not closed, f"closed with requests unanswered: {left_over}"
                assert left > 0, f"unanswered after {timeout} s: {left_over}"
                self.changed.wait(left)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"condition not reached within {timeout} s"
                self.changed.wait(left)

    # -- checking ------------------------------------------------------------------------

    def counts(self, conns: Iterable[str] | None = None) -> Counter[str]:
        """Outcomes of submits the clients saw (first answers): "result" or the error code."""
        names = set(self.order if conns is None else conns)
        with self.changed:
            return Counter(
                outcome_of(e.answers[0])
                for (conn, _), e in self.expected.items()
                if conn in names and e.answers and e.submit
            )

    def silent(self, conn: str) -> list[Key]:
        """Requests on `conn` without an answer although a later one was answered.

        The daemon reads a connection's lines in order, so everything sent before an answered
        request was read too (accepted or refused) and must have been answered; only a tail
        it never read may be silent.
        """
        with self.changed:
            order = self.order.get(conn, [])
            answered = [i for i, k in enumerate(order) if self.expected[conn, k].answers]
            if not answered:
                return []
            return [k for k in order[: answered[-1]] if not self.expected[conn, k].answers]

    def problems(self) -> list[str]:
        """Everything wrong with the answers so far (unanswered submits not included)."""
        found: list[str] = []
        with self.changed:
            for (conn, key), entry in self.expected.items():
                where = f"{conn}/{key!r}"
                if len(entry.answers) > 1:
                    found.append(f"{where}: {len(entry.answers)} responses: {entry.answers}")
                for response in entry.answers[:1]:
                    found.extend(f"{where}: {p}" for p in _check(entry, response))
            found.extend(f"{conn}: stray response {r}" for conn, r in self.strays)
        return found

    def assert_clean(self) -> None:
        problems = self.problems()
        assert not problems, "\n".join(problems[:20])
        assert not self.violations, "\n".join(self.violations[:20])
        assert self.unanswered() == 0, f"unanswered: {dict(self._unanswered)}"

    def check_status(
        self, status: dict[str, Any], baseline: dict[str, Any] | None, *, idle: bool = False
    ) -> None:
        """Record any broken invariant in `status` (a `status` op's result)."""
        outcomes = status["outcomes"]
        ended = sum(outcomes.values())
        pending = status["queued"] + status["in_flight"]
        with self.changed:
            self.samples += 1
            if set(outcomes) != set(OUTCOMES):
                self.violations.append(f"outcome names {sorted(outcomes)}")
            if status["submitted"] != ended + pending:
                self.violations.append(
                    f"submitted {status['submitted']} != outcomes {ended} + queued "
                    f"{status['queued']} + in_flight {status['in_flight']}: {outcomes}"
                )
        if not idle:
            return
        seen = self.counts()
        base = baseline["outcomes"] if baseline else dict.fromkeys(OUTCOMES, 0)
        since = {code: outcomes[code] - base.get(code, 0) for code in OUTCOMES}
        client = {code: seen.get(code, 0) for code in OUTCOMES}
        submitted = status["submitted"] - (baseline["submitted"] if baseline else 0)
        accepted = sum(n for code, n in seen.items() if code in OUTCOMES)
        with self.changed:
            if pending:
                self.violations.append(f"not idle: {pending} actions pending")
            if since != client:
                self.violations.append(f"daemon outcomes {since} != client outcomes {client}")
            if submitted != accepted:
                self.violations.append(
                    f"daemon accepted {submitted} actions, the clients saw {accepted} outcomes"
                )


def _check(entry: Expected, response: Response) -> list[str]:
    if response.get("ok") is True:
        if entry.result is NO_RESULT:
            return [f"a result {response.get('result')!r} where one of {set(entry.codes)} was due"]
        if entry.result is ANY:
            return []
        want = entry.action if entry.result is SAME else entry.result
        if response.get("result") != want:
            return [f"wrong result {response.get('result')!r}, expected {want!r}"]
        return []
    if response.get("ok") is not False:
        return [f"neither ok nor an error: {response}"]
    error = response.get("error")
    if not isinstance(error, dict):
        return [f"no error object: {response}"]
    code = error.get("code")
    problems = []
    if code not in entry.codes:
        problems.append(f"error {code!r} (allowed: {sorted(entry.codes)}): {error}")
    if not isinstance(error.get("message"), str) or not error["message"]:
        problems.append(f"error without a message: {error}")
    return problems


class Line:
    """A raw `Connection` whose responses a thread reads into the ledger."""

    def __init__(self, path: Path, ledger: Ledger, name: str) -> None:
        self.name = name
        self.ledger = ledger
        self.conn = Connection(path)
        # The reader blocks until data or EOF; deadlines are the waiters' business.
        self.conn.sock.settimeout(None)
        self._sending = threading.Lock()
        self.errors: list[BaseException] = []
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                response = self.conn.receive()
                if response is None:
                    break
                self.ledger.record(self.name, response)
        except (OSError, ValueError) as exc:
            # ValueError: a response that is not JSON (that is a failure: it shows in errors).
            if not isinstance(exc, OSError):
                self.errors.append(exc)
        finally:
            self.ledger.end(self.name)

    def submit(
        self,
        key: Key,
        action: Any,
        *,
        result: Any = SAME,
        codes: Iterable[str] = (),
        **fields: Any,
    ) -> None:
        self.submit_many([(key, action)], result=result, codes=codes, **fields)

    def submit_many(
        self,
        items: Iterable[tuple[Key, Any]],
        *,
        result: Any = SAME,
        codes: Iterable[str] = (),
        **fields: Any,
    ) -> None:
        codes = frozenset(codes)
        data = []
        with self._sending:
            for key, action in items:
                self.ledger.expect(self.name, key, action, result, codes)
                request = {"id": key, "op": "submit", "action": action, **fields}
                data.append(json.dumps(request).encode() + b"\n")
            self.conn.sock.sendall(b"".join(data))

    def request(self, key: Key, op: str, *, result: Any = ANY, **fields: Any) -> None:
        """Send another op (not a submit): it must be answered with `result` (default: any)."""
        with self._sending:
            self.ledger.expect(self.name, key, None, result, (), submit=False)
            self.conn.sock.sendall(json.dumps({"id": key, "op": op, **fields}).encode() + b"\n")

    def wait(self, key: Key, timeout: float = 20.0) -> Response:
        return self.ledger.wait_for(self.name, key, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(10)
        self.conn.close()
        assert not self.errors, self.errors


class Load:
    """Good actions kept in flight on a line of their own, until stopped.

    Every `sample_every` chunks it samples `status` (through `sample`; 0: never) so the
    counters are checked while work and faults are under way. Good actions may be retried
    (`max_attempts`), so unless a test says otherwise each must end with its result.
    """

    def __init__(
        self,
        line: Line,
        sample: Callable[[], object],
        *,
        window: int = 48,
        chunk: int = 8,
        max_attempts: int = 3,
        codes: Iterable[str] = (),
        sample_every: int = 10,
    ) -> None:
        self.line = line
        self.sample = sample
        self.window = window
        self.chunk = chunk
        self.max_attempts = max_attempts
        self.codes = frozenset(codes)
        self.sample_every = sample_every
        self.sent = 0
        self._stop = threading.Event()
        self._paused = threading.Event()
        self.failure: BaseException | None = None
        self.broken = False
        self._thread = threading.Thread(target=self._run, name=f"load-{line.name}", daemon=True)
        self._thread.start()

    def _room(self) -> bool:
        if self._stop.is_set() or self._paused.is_set():
            return True
        if self.line.name in self.line.ledger.ended:
            return True
        return self.line.ledger._unanswered[self.line.name] <= self.window - self.chunk

    def _run(self) -> None:
        ledger = self.line.ledger
        counter = itertools.count()
        try:
            for chunks in itertools.count():
                with ledger.changed:
                    while not self._room():
                        ledger.changed.wait()
                if self._stop.is_set() or self.line.name in ledger.ended:
                    return
                if self._paused.is_set():
                    self._paused_wait()
                    continue
                keys = [next(counter) for _ in range(self.chunk)]
                self.line.submit_many(
                    ((k, good_action(k)) for k in keys),
                    codes=self.codes,
                    max_attempts=self.max_attempts,
                )
                self.sent += len(keys)
                if self.sample_every and chunks % self.sample_every == 0:
                    self.sample()
        except OSError:
            self.broken = True  # the daemon went away (a test that kills it expects this)
        except BaseException as exc:
            self.failure = exc

    def _paused_wait(self) -> None:
        ledger = self.line.ledger
        with ledger.changed:
            while self._paused.is_set() and not self._stop.is_set():
                ledger.changed.wait()

    def pause(self, timeout: float = 20.0) -> None:
        """No new actions; returns once every action sent so far is answered."""
        self._paused.set()
        with self.line.ledger.changed:
            self.line.ledger.changed.notify_all()
        self.line.ledger.wait_answered([self.line.name], timeout)

    def resume(self) -> None:
        self._paused.clear()
        with self.line.ledger.changed:
            self.line.ledger.changed.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self.line.ledger.changed:
            self.line.ledger.changed.notify_all()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not stop"
        if self.failure is not None:
            raise self.failure


class Accounting:
    """Lines, loads and status checks around one daemon; `finish()` asserts the books."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ledger = Ledger()
        self.lines: list[Line] = []
        self.loads: list[Load] = []
        self._status = Connection(daemon.socket)
        self._status_lock = threading.Lock()
        self._status_ids = itertools.count()
        #: Samples are checked only while no `unsampled()` block is open; the epoch changes
        #: whenever one opens or closes, so a sample overlapping a block is never checked.
        self._unsampled = 0
        self._epoch = 0
        self.baseline = self.status()

    def status(self) -> dict[str, Any]:
        with self._status_lock:
            response = self._status.request({"id": next(self._status_ids), "op": "status"})
        assert response.get("ok") is True, response
        result: dict[str, Any] = response["result"]
        return result

    def sample(self) -> dict[str, Any]:
        """A status snapshot, its invariants checked (unless an `unsampled()` block overlaps)."""
        with self._status_lock:
            epoch, blocked = self._epoch, self._unsampled
        status = self.status()
        with self._status_lock:
            if blocked or epoch != self._epoch:
                return status
        self.ledger.check_status(status, self.baseline)
        return status

    @contextlib.contextmanager
    def unsampled(self) -> Iterator[None]:
        """Status samples are not checked in the block (the final, idle check still is)."""
        with self._status_lock:
            self._unsampled += 1
            self._epoch += 1
        try:
            yield
        finally:
            with self._status_lock:
                self._unsampled -= 1
                self._epoch += 1

    def line(self, name: str) -> Line:
        line = Line(self.daemon.socket, self.ledger, name)
        self.lines.append(line)
        return line

    def load(self, name: str = "load", **options: Any) -> Load:
        load = Load(self.line(name), self.sample, **options)
        self.loads.append(load)
        return load

    def wait_idle(self, timeout: float = 20.0) -> dict[str, Any]:
        """Re-query status until nothing is queued or in flight and every slot is served."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.sample()
            settled = all(w["pid"] is not None and w["state"] == "idle" for w in status["workers"])
            if status["queued"] == 0 and status["in_flight"] == 0 and settled:
                return status
            assert time.monotonic() < deadline, f"not idle after {timeout} s: {status}"

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the loads, wait for every answer and an idle daemon, check everything."""
        for load in self.loads:
            load.stop()
        self.ledger.wait_answered(timeout=timeout)
        status = self.wait_idle(timeout)
        self.ledger.check_status(status, self.baseline, idle=True)
        self.ledger.assert_clean()
        for load in self.loads:
            assert load.sent > 0, "the background load sent nothing"
        return status

    def close(self) -> None:
        for load in self.loads:
            with contextlib.suppress(BaseException):
                load.stop(5)
        for line in self.lines:
            line.close()
        self._status.close()


@contextlib.contextmanager
def accounting(daemon: Daemon) -> Iterator[Accounting]:
    books = Accounting(daemon)
    try:
        yield books
    finally:
        books.close()
