"""The operators' HTTP listener: metrics, status, the page and its event stream, hardened.

Every test talks to a real daemon over real TCP with the standard library's HTTP client;
the listener asks for port 0 and the test reads the port back from `http.listening`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from qoper8d._http import MAX_HEAD_BYTES
from qoper8d._metrics import open_registry, render
from qoper8d.cli import EXIT_SOCKET
from qoper8d.config import config_from_mapping
from qoper8d.errors import ConfigError
from qoper8d.stats import DURATION_BOUNDS, OUTCOMES, Durations, PoolStatistics
from tests.harness import SNAPSHOT_FIELDS, Connection, Daemon, base_config, running_daemon

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-do-not-serve"  # noqa: S105 - the string no page may show


def http_errors(**http: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"http": http}, "f.toml")
    errors: list[str] = caught.value.details["errors"]
    return errors


def test_the_listen_address_is_validated_and_loopback_unless_allowed() -> None:
    assert config_from_mapping({}).http.listen == "", "off by default"
    for good in ("127.0.0.1:9808", "[::1]:0", "localhost:80", "127.1.2.3:65535"):
        assert config_from_mapping({"http": {"listen": good}}).http.listen == good
    assert http_errors(listen="0.0.0.0:9808") == [
        'f.toml: http.listen: "0.0.0.0:9808" is not a loopback address; '
        "set http.allow_remote = true to serve other machines too"
    ]
    remote = {"listen": "0.0.0.0:9808", "allow_remote": True}
    assert config_from_mapping({"http": remote}).http.address() == ("0.0.0.0", 9808)  # noqa: S104
    assert http_errors(listen="127.0.0.1:99999") == [
        "f.toml: http.listen: expected a port from 0 to 65535 (0: any free port), "
        'got "127.0.0.1:99999"'
    ]
    (line,) = http_errors(listen="q8.example:9808", allow_remote=True)
    assert line.startswith("f.toml: http.listen: expected an IP address or localhost")
    (line,) = http_errors(listen="::1:9808")
    assert line.startswith("f.toml: http.listen: expected")
    (line,) = http_errors(listen="127.0.0.1")
    assert line.startswith('f.toml: http.listen: expected "host:port"')
    assert http_errors(max_clients=0, push_interval=0) == [
        "f.toml: http.max_clients: expected an integer >= 1, got 0",
        "f.toml: http.push_interval: expected a number of seconds >= 0.01, got 0",
    ]


def test_duration_counts_become_cumulative_buckets_in_the_daemons_own_registry() -> None:
    counts = [0] * (len(DURATION_BOUNDS) + 1)
    counts[0], counts[3], counts[-1] = 2, 5, 1  # <= 4 µs, <= 32 µs, past every bound
    stats = PoolStatistics(
        state="running", size=1, busy=0, idle=1, queued=0, queued_bytes=0, in_flight=0,
        submitted=8, outcomes={"result": 8}, restarts=0, uptime=1.0, workers=(),
        durations=Durations(counts=tuple(counts), total=40.5),
    )  # fmt: skip
    registry = open_registry(lambda: stats, dict)
    got = samples(render(registry).decode())
    name = "qoper8d_action_duration_seconds"
    assert got[(f"{name}_bucket", (("le", "4e-06"),))] == 2
    assert got[(f"{name}_bucket", (("le", "1.6e-05"),))] == 2
    assert got[(f"{name}_bucket", (("le", "3.2e-05"),))] == 7
    assert got[(f"{name}_bucket", (("le", "16.777216"),))] == 7
    assert got[(f"{name}_bucket", (("le", "+Inf"),))] == 8
    assert (got[(f"{name}_count", ())], got[(f"{name}_sum", ())]) == (8, 40.5)
    # prometheus-client's global registry never sees the daemon's metrics.
    assert REGISTRY.get_sample_value("qoper8d_submitted_total") is None
    assert registry.get_sample_value("qoper8d_submitted_total") == 8


class Web:
    """The daemon's listener, from `http.listening`."""

    def __init__(self, daemon: Daemon) -> None:
        event = daemon.wait_event("http.listening")
        self.port: int = event["port"]
        self.url: str = event["url"]

    def request(
        self, path: str, method: str = "GET", host: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.putrequest(method, path, skip_host=True)
            conn.putheader("Host", host or f"127.0.0.1:{self.port}")
            conn.endheaders()
            response = conn.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            conn.close()

    def get(self, path: str) -> bytes:
        status, _, body = self.request(path)
        assert status == 200, (path, status, body)
        return body

    def status(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = json.loads(self.get("/status"))
        return snapshot

    @contextmanager
    def events(self) -> Iterator[Iterator[dict[str, Any]]]:
        """An open /events stream, as the snapshots it sends."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("GET", "/events")
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("content-type") == "text/event-stream"

            def snapshots() -> Iterator[dict[str, Any]]:
                for raw in response:
                    if raw.startswith(b"data: "):
                        yield json.loads(raw[6:])

            yield snapshots()
        finally:
            conn.close()


def listening(tmp: Path, **http: Any) -> Any:
    return running_daemon(tmp, http={"listen": "127.0.0.1:0", **http})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_status_and_events_serve_counts_and_never_an_action(short_tmp: Path) -> None:
    with listening(short_tmp) as d, Connection(d.socket) as c:
        web = Web(d)
        assert d.wait_event("http.listening")["url"] == f"http://127.0.0.1:{web.port}"
        before = samples(web.get("/metrics").decode())
        bucket = ("qoper8d_action_duration_seconds_bucket", (("le", "+Inf"),))
        assert before[bucket] == 0, "no action timed yet: every bucket 0"
        assert before[("qoper8d_workers", (("state", "idle"),))] == 2
        ok = c.request({"id": 1, "op": "submit", "action": {"mode": "ok", "secret": SECRET}})
        assert ok["result"]["secret"] == SECRET
        failed = c.request(
            {"id": 2, "op": "submit", "action": {"mode": "raise", "message": SECRET}}
        )
        assert failed["error"]["code"] == "handler_error"
        lost = c.request({"id": 3, "op": "submit", "action": {"mode": "exit", "code": 7}})
        assert lost["error"]["code"] == "worker_lost"
        d.wait_count("worker.ready", 3)  # the lost worker's replacement
        op_status = c.request({"id": 4, "op": "status"})["result"]

        metrics = web.get("/metrics").decode()
        got = samples(metrics)
        assert got[("qoper8d_submitted_total", ())] == 3
        for outcome in OUTCOMES:
            expected = 1 if outcome in ("result", "handler_error", "worker_lost") else 0
            assert got[("qoper8d_actions_total", (("outcome", outcome),))] == expected, outcome
        assert got[("qoper8d_queue_depth", ())] == 0
        assert got[("qoper8d_worker_restarts_total", ())] == op_status["restarts"] == 1
        assert sum(v for (name, _), v in got.items() if name == "qoper8d_workers") == 2
        buckets = [v for (name, _), v in got.items() if name.endswith("_seconds_bucket")]
        assert len(buckets) == len(DURATION_BOUNDS) + 1
        assert buckets == sorted(buckets), "cumulative"
        assert got[("qoper8d_action_duration_seconds_count", ())] == buckets[-1]
        assert got[("process_open_fds", ())] > 0, "the master's process metrics"

        status = web.status()
        assert set(status) == SNAPSHOT_FIELDS
        assert status["submitted"] == op_status["submitted"] == 3
        assert status["daemon"]["http"] == web.url
        assert status["daemon"]["pid"] == d.proc.pid

        page = web.get("/")
        assert page.startswith(b"<!doctype html>")
        assert b"EventSource" in page
        assert b"http://" not in page, "nothing fetched elsewhere"
        assert b"https://" not in page
        with web.events() as stream:
            first = next(stream)
            assert first["submitted"] == 3
            assert set(first) == SNAPSHOT_FIELDS
            streamed = json.dumps(first)
        for body in (metrics, json.dumps(status), page.decode(), streamed):
            assert SECRET not in body


def test_hosts_methods_and_paths_other_than_the_listeners_are_refused(short_tmp: Path) -> None:
    with listening(short_tmp, allowed_hosts=["q8.example"]) as d:
        web = Web(d)
        named = (f"localhost:{web.port}", f"LOCALHOST:{web.port}", f"[::1]:{web.port}")
        for host in (*named, f"q8.example:{web.port}"):
            assert web.request("/status", host=host)[0] == 200, host
        for host in ("evil.example", f"evil.example:{web.port}", "127.0.0.1", "127.0.0.1:1"):
            status, _, body = web.request("/status", host=host)
            assert status == 421, host
            assert b"submitted" not in body
        status, _, _ = web.request("/nowhere", host="evil.example")
        assert status == 421, "the Host is checked before the path"
        for method in ("HEAD", "POST", "PUT", "DELETE", "OPTIONS"):
            status, headers, _ = web.request("/metrics", method)
            assert (status, headers["allow"]) == (405, "GET"), method
        assert web.request("/nowhere")[0] == 404
        with socket.create_connection(("127.0.0.1", web.port), timeout=20) as raw:
            raw.sendall(
                f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert raw.recv(100).startswith(b"HTTP/1.1 403"), "no WebSocket"
        # [http] is read at the start only; a reload says so and the listener stays put.
        d.config["http"]["push_interval"] = 2.0
        d.config_path.write_text(tomli_w.dumps(d.config))
        with Connection(d.socket) as c:
            changed = c.request({"id": 1, "op": "reload"})["result"]["changed"]
        assert changed == ["http.push_interval: 1.0 -> 2.0 (takes effect after a restart)"]
        assert web.status()["daemon"]["http"] == web.url
        # A request head past hypercorn's bound is answered without growing it further.
        with socket.create_connection(("127.0.0.1", web.port), timeout=20) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES)
            assert raw.recv(100).startswith(b"HTTP/1.1 431")  # headers too large


def test_event_streams_are_bounded_and_one_ending_frees_its_place(short_tmp: Path) -> None:
    with listening(short_tmp, max_clients=2, push_interval=0.05) as d:
        web = Web(d)
        with web.events() as one, web.events() as two:
            next(one)
            assert next(two)["daemon"]["http_event_clients"] == 2
            status, headers, _ = web.request("/events")
            assert (status, headers["retry-after"]) == (503, "5")
            assert web.status()["daemon"]["http_event_clients"] == 2
            seen = [s["uptime"] for s, _ in zip(one, range(3), strict=False)]
            assert seen == sorted(set(seen)), "a fresh snapshot each push"
        # The daemon notices the disconnections; a third client gets a place then.
        with web.events() as three:
            for snapshot in three:
                if snapshot["daemon"]["http_event_clients"] == 1:
                    break
            # An open page does not hold up a stop: its stream ends with the daemon.
            assert d.stop() == 0
            left = list(three)  # ends (no read timeout): the daemon closed the stream
            assert all(snapshot["submitted"] == 0 for snapshot in left)


def raw_get(port: int, path: str = "/status") -> bytes:
    """The first bytes of the answer to a GET on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        # A refusal may be sent, and the connection closed, before the request is read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            raw.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return raw.recv(100)


def test_connections_are_bounded_and_one_closing_frees_its_place(short_tmp: Path) -> None:
    # Event streams hold their connections (a request in progress: no keep-alive timeout);
    # a closed connection's place is free once hypercorn's keep-alive timer for it ran out.
    with listening(short_tmp, max_connections=2, keep_alive_timeout=0.2) as d:
        web = Web(d)
        with web.events() as one, web.events() as two:
            next(one)
            assert next(two)["daemon"]["http_connections"] == 2
            assert raw_get(web.port).startswith(b"HTTP/1.1 503")
            assert next(one)["daemon"]["http_connections"] == 2, "a refusal takes no place"
        deadline = time.monotonic() + 20
        while not (answer := raw_get(web.port)).startswith(b"HTTP/1.1 200"):
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert time.monotonic() < deadline, "the closed connections' places stayed taken"


def test_a_client_that_stops_reading_is_dropped_by_the_kernel(short_tmp: Path) -> None:
    with listening(short_tmp, push_interval=0.01, write_timeout=0.5) as d:
        web = Web(d)
        stuck = socket.socket()
        # A small window, so that the daemon's sends fill it within a few snapshots.
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", web.port))
        try:
            stuck.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
            with web.events() as stream:
                assert any(s["daemon"]["http_event_clients"] == 2 for s in stream)
                # It never reads: once its window is full the kernel aborts the connection.
                assert any(s["daemon"]["http_event_clients"] == 1 for s in stream)
            with pytest.raises(ConnectionResetError):
                _read_to_the_end(stuck)
        finally:
            stuck.close()


def test_a_stop_does_not_wait_for_a_client_that_stopped_reading(short_tmp: Path) -> None:
    with listening(short_tmp, push_interval=0.01, write_timeout=600) as d:
        web = Web(d)
        with socket.socket() as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.connect(("127.0.0.1", web.port))
            stuck.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
            with web.events() as stream:
                # 300 snapshots offered to the stuck client too: far past its window.
                offered = list(zip(stream, range(300), strict=False))
                assert offered[-1][0]["daemon"]["http_event_clients"] == 2
            # Its send is stuck for good (600 s); the stop ends it rather than wait.
            assert d.stop(timeout=20) == 0


def _read_to_the_end(sock: socket.socket) -> None:
    while sock.recv(1 << 20):
        pass


def test_an_ipv6_loopback_listener_names_itself_in_brackets(short_tmp: Path) -> None:
    with running_daemon(short_tmp, http={"listen": "[::1]:0"}) as d:
        event = d.wait_event("http.listening")
        port = event["port"]
        assert event["url"] == f"http://[::1]:{port}"
        for host, expected in ((f"[::1]:{port}", 200), (f"localhost:{port}", 200), ("::1", 421)):
            conn = http.client.HTTPConnection("::1", port, timeout=20)
            try:
                conn.request("GET", "/metrics", headers={"Host": host})
                assert conn.getresponse().status == expected, host
            finally:
                conn.close()


def test_a_port_in_use_stops_the_start_before_any_worker(short_tmp: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = base_config(short_tmp, http={"listen": f"127.0.0.1:{port}"})
        daemon = Daemon(short_tmp, config, ready=False)
        try:
            assert daemon.wait() == EXIT_SOCKET
            event = daemon.wait_event("daemon.socket_unusable")
            assert f"http.listen '127.0.0.1:{port}'" in event["error"]
            assert not daemon.of("worker.ready")
        finally:
            daemon.close()
