"""Many nodes on one Redis stream (SPEC 11): real daemons on a real redis-server.

Every test that starts daemons waits on their handshakes, log events and answers (never on
sleeps), has a deadline through the harness's timeouts, and leaves no process behind
(`no_orphans`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qoper8d import config
from qoper8d.config import load_config
from qoper8d.ctl import format_status, status_problems
from qoper8d.errors import ConfigError
from tests.harness import ROOT, Connection, Daemon, base_config
from tests.redis_fixtures import RedisServer, cluster_section


def node(
    tmp: Path, name: str, cluster: dict[str, Any], server: dict[str, Any] | None = None, **pool: Any
) -> Daemon:
    """A daemon called `name` in its own directory under `tmp`, on `cluster` (`server`: keys
    of its `[server]` section besides the socket)."""
    directory = tmp / name
    directory.mkdir(mode=0o700, exist_ok=True)
    config = base_config(
        directory, cluster={**cluster, "node": name}, pool=pool, server=server or {}
    )
    return Daemon(directory, config)


def status(daemon: Daemon) -> dict[str, Any]:
    with Connection(daemon.socket) as conn:
        reply = conn.request({"id": "s", "op": "status"})
    assert reply["ok"], reply
    return reply["result"]  # type: ignore[no-any-return]


def until(daemon: Daemon, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The daemon's status once `check(status)` holds (asked again each time it does not)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = status(daemon)
        if check(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"status never matched: {snapshot}"


def consumers(server: RedisServer, stream: str) -> list[str]:
    """The names of the consumers in `stream`'s group."""
    lines = server.cli("XINFO", "CONSUMERS", stream, stream).split("\n")
    return sorted(lines[i + 1] for i, line in enumerate(lines) if line == "name")


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('backend = "etcd"', "cluster.backend"),
        ('url = "http://127.0.0.1:6379"', "cluster.url"),
        ('stream = "has space"', "cluster.stream"),
        ("claim_idle = 0", "cluster.claim_idle"),
        ("max_deliveries = 0", "cluster.max_deliveries"),
        ("prefetch = -1", "cluster.prefetch"),
        ("bogus = 1", "cluster.bogus"),
    ],
)
def test_cluster_keys_are_validated(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "q.toml"
    path.write_text(f"[cluster]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value.details.get("errors", [info.value.message]))


@pytest.mark.parametrize(
    ("section", "key"), [("server", "max_message_bytes"), ("pool", "max_result_bytes")]
)
def test_a_cluster_node_carries_no_action_or_result_longer_than_redis_takes(
    tmp_path: Path, section: str, key: str
) -> None:
    path = tmp_path / "q.toml"
    most = config.CLUSTER_MAX_BYTES
    cluster = '[cluster]\nbackend = "redis"\n'
    path.write_text(f"[{section}]\n{key} = {most}\n{cluster}")
    assert getattr(getattr(load_config(path), section), key) == most
    path.write_text(f"[{section}]\n{key} = {most + 1}\n{cluster}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.details["errors"] == [
        f'{path}: {section}.{key}: at most {most} with cluster.backend = "redis" (one Redis '
        f"argument each), got {most + 1}"
    ]
    path.write_text(f"[{section}]\n{key} = {most + 1}\n")  # alone, no bound but its own
    assert getattr(getattr(load_config(path), section), key) == most + 1


def test_backend_none_imports_no_redis_client() -> None:
    # The daemon's whole import graph, as `qoper8d --config` loads it, without coredis.
    code = (
        "import sys, qoper8d.cli, qoper8d.daemon, qoper8d.control;"
        "assert 'coredis' not in sys.modules and 'qoper8d._node' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


def test_redis_unreachable_at_start_exits_7(short_tmp: Path) -> None:
    cluster = {"backend": "redis", "url": f"unix://{short_tmp}/nobody.sock"}
    daemon = Daemon(short_tmp, base_config(short_tmp, cluster=cluster), ready=False)
    try:
        assert daemon.wait() == 7
        failed = daemon.wait_event("daemon.cluster_unavailable")
        assert "nobody.sock" in failed["error"]
        # Refused before any worker was started for nothing.
        assert not daemon.of("worker.ready")
        assert not daemon.socket.exists()
    finally:
        daemon.close()


# -- one pool over two nodes --------------------------------------------------------------


def test_two_nodes_run_each_others_submits(short_tmp: Path, redis_session: RedisServer) -> None:
    # Claims renewed every 0.2 s: a node loses one only if stalled for 0.4 s (a loaded box).
    cluster = cluster_section(redis_session, claim_idle=0.6)
    gate, record = short_tmp / "gate", short_tmp / "record"
    a = node(short_tmp, "a", cluster, size=1)
    b: Daemon | None = None
    try:
        with Connection(a.socket) as conn:
            # A's one worker is busy, and A has no room for more (prefetch 0).
            conn.send(
                {"id": "gate", "op": "submit", "action": {"mode": "wait_for", "path": str(gate)}}
            )
            until(a, lambda s: s["busy"] == 1)
            b = node(short_tmp, "b", cluster, size=2)
            conn.send(*({"id": i, "op": "submit", "action": {"mode": "pid"}} for i in range(6)))
            replies = conn.receive_all(6)
            b_pids = {w["pid"] for w in status(b)["workers"]}
            assert all(r["ok"] for r in replies), replies
            assert {r["result"] for r in replies} <= b_pids
            assert {r["id"] for r in replies} == set(range(6))
            gate.touch()
            last = conn.receive()
            assert last is not None
            assert last["id"] == "gate"
            assert last["ok"]
            assert last["result"] in {w["pid"] for w in status(a)["workers"]}
            seen = status(a)["cluster"]
            assert (seen["backend"], seen["node"], seen["connected"]) == ("redis", "a", True)
            until(a, lambda s: sorted(n["node"] for n in s["cluster"]["nodes"]) == ["a", "b"])
            # A long action (three times claim_idle) keeps its claim: whichever node runs it,
            # the other, idle beside it, never takes it over, so it runs once.
            action = {"mode": "pid", "sleep": 1.8, "record": str(record), "id": "long"}
            assert conn.request({"id": "long", "op": "submit", "action": action})["ok"]
            assert record.read_text().split() == ["long"]
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        a.close()
        if b is not None:
            b.close()


# -- failures ------------------------------------------------------------------------------


def busy_with_gate(conn: Connection, daemon: Daemon, gate: Path) -> None:
    """Keep `daemon`'s one worker busy until `gate` exists (its prefetch 0: it takes no more)."""
    action = {"mode": "wait_for", "path": str(gate)}
    conn.send({"id": "gate", "op": "submit", "action": action})
    until(daemon, lambda s: s["busy"] == 1)


@pytest.mark.parametrize("max_deliveries", [3, 1])
def test_a_killed_nodes_entries_are_taken_over(
    short_tmp: Path, redis_session: RedisServer, max_deliveries: int
) -> None:
    cluster = cluster_section(redis_session, claim_idle=0.5, max_deliveries=max_deliveries)
    gate, held = short_tmp / "gate", short_tmp / "held"
    record = short_tmp / "record"
    a = node(short_tmp, "a", cluster, size=1)
    b: Daemon | None = None
    try:
        with Connection(a.socket) as conn:
            busy_with_gate(conn, a, gate)
            b = node(short_tmp, "b", cluster, size=2)
            action = {"mode": "wait_for", "path": str(held), "record": str(record)}
            conn.send(*({"id": i, "op": "submit", "action": {**action, "id": i}} for i in (1, 2)))
            until(b, lambda s: s["busy"] == 2)
            b.kill()  # mid-batch: both entries taken, neither answered
            held.touch()
            gate.touch()
            replies = conn.receive_all(3)
            by_id = {r["id"]: r for r in replies}
            assert sorted(by_id, key=str) == [1, 2, "gate"]
            a_pid = {w["pid"] for w in status(a)["workers"]}
            if max_deliveries == 1:
                for i in (1, 2):
                    assert by_id[i]["error"]["code"] == "poisoned", by_id[i]
                dead = redis_session.cli("XLEN", f"{cluster['stream']}:dead")
                assert dead == "2"
                # Not run a second time: each ran once, on B.
                assert sorted(record.read_text().split()) == ["1", "2"]
            else:
                assert {by_id[i]["result"] for i in (1, 2)} <= a_pid
                assert sorted(record.read_text().split()) == ["1", "1", "2", "2"]
                # B's consumer, its entries taken over, is removed from the group.
                until(a, lambda s: consumers(redis_session, cluster["stream"]) == ["a"])
            # Answered and gone from the stream: nothing pending, nothing waiting.
            seen = until(a, lambda s: s["cluster"]["pending"] == 0)["cluster"]
            assert seen["waiting"] == 0
        assert a.stop() == 0
    finally:
        a.close()
        if b is not None:
            b.close()


def test_redis_killed_and_restarted_under_load(short_tmp: Path, redis_own: RedisServer) -> None:
    cluster = cluster_section(redis_own, claim_idle=1.0)
    gate = short_tmp / "gate"
    a = node(short_tmp, "a", cluster, size=2)
    try:
        with Connection(a.socket) as conn:
            action = {"mode": "wait_for", "path": str(gate)}
            conn.send(*({"id": i, "op": "submit", "action": action} for i in range(20)))
            # Accepted: every one is in the stream (two taken, running).
            until(a, lambda s: redis_own.cli("XLEN", cluster["stream"]) == "20")
            redis_own.kill()
            lost = until(a, lambda s: not s["cluster"]["connected"])
            assert status_problems(lost) == ["the cluster node has lost Redis"]
            assert "NOT CONNECTED" in format_status(lost)
            refused = conn.request({"id": "late", "op": "submit", "action": {"mode": "pid"}})
            assert refused["error"]["code"] == "unavailable", refused
            redis_own.start()
            until(a, lambda s: s["cluster"]["connected"], timeout=30)
            gate.touch()
            replies = conn.receive_all(20)
            assert sorted(r["id"] for r in replies) == list(range(20))
            assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
            again = conn.request({"id": "again", "op": "submit", "action": {"mode": "pid"}})
            assert again["ok"], again
            assert status(a)["cluster"]["outages"] == 1
            assert len(a.of("cluster.disconnected")) == len(a.of("cluster.connected")) == 1
            # Someone else's hand on our keys: logged, stream and group made again, no crash.
            redis_own.cli("DEL", cluster["stream"])
            a.wait_event("cluster.redis_error")
            assert conn.request({"id": "after", "op": "submit", "action": {"mode": "pid"}})["ok"]
        assert a.stop() == 0
    finally:
        a.close()


def test_a_stalled_node_loses_its_entries_and_its_late_reply_is_dropped(
    short_tmp: Path, redis_session: RedisServer
) -> None:
    cluster = cluster_section(redis_session, claim_idle=0.5)
    gate, held, record = short_tmp / "gate", short_tmp / "held", short_tmp / "record"
    a = node(short_tmp, "a", cluster, size=1)
    b: Daemon | None = None
    try:
        with Connection(a.socket) as conn:
            busy_with_gate(conn, a, gate)
            b = node(short_tmp, "b", cluster, size=1)
            action = {"mode": "wait_for", "path": str(held), "record": str(record), "id": 1}
            conn.send({"id": 1, "op": "submit", "action": action})
            until(b, lambda s: s["busy"] == 1)
            b_pid = status(b)["workers"][0]["pid"]
            os.kill(b.proc.pid, signal.SIGSTOP)  # out of touch, its worker still running
            try:
                gate.touch()
                assert conn.receive() is not None  # the gate's answer
                # A takes the entry over once B has been silent past claim_idle.
                until(a, lambda s: s["busy"] == 1)
                held.touch()
                first = conn.receive()
                assert first is not None
                assert first["id"] == 1
                assert first["result"] != b_pid
            finally:
                os.kill(b.proc.pid, signal.SIGCONT)
            # B's worker ran it too (recorded when it started). Resumed, B either reads its
            # answer first, whose reply is then refused, or learns first that the entry is
            # no longer its own and stops the job: either way A answers nothing more.
            ended = until(b, lambda s: s["outcomes"]["result"] + s["outcomes"]["cancelled"] == 1)
            assert record.read_text().split() == ["1", "1"]
            if ended["outcomes"]["cancelled"]:
                assert [e["reason"] for e in ended["recent_exits"]] == ["cancelled"]
            # Holding nothing, with a worker ready again (B's own if it was stopped).
            until(b, lambda s: s["cluster"]["held"] == 0 and s["idle"] == 1)
            conn.request({"id": "s", "op": "status"})  # the next line is this answer
            assert b.stop() == 0
        assert a.stop() == 0
    finally:
        a.close()
        if b is not None:
            b.close()


def test_cancel_reaches_the_node_running_it(short_tmp: Path, redis_session: RedisServer) -> None:
    cluster = cluster_section(redis_session, claim_idle=1.0)  # status: fresh every 1/3 s
    a = node(short_tmp, "a", cluster, size=1)
    b: Daemon | None = None
    try:
        with Connection(a.socket) as conn:
            busy_with_gate(conn, a, short_tmp / "never")
            b = node(short_tmp, "b", cluster, size=1, grace_period=0.2)
            conn.send({"id": 1, "op": "submit", "action": {"mode": "hang"}})
            until(b, lambda s: s["busy"] == 1)
            b_pid = status(b)["workers"][0]["pid"]
            conn.send({"id": "c", "op": "cancel", "target": 1})
            replies = {r["id"]: r for r in conn.receive_all(2)}
            assert replies["c"]["result"] == {"cancelled": True}
            assert replies[1]["error"]["code"] == "cancelled"
            # B killed the worker running it and started another.
            until(b, lambda s: s["workers"][0]["pid"] not in (None, b_pid))
            assert status(b)["outcomes"]["cancelled"] == 1
            # Not yet taken: removed from the stream, never run.
            conn.send({"id": 2, "op": "submit", "action": {"mode": "hang"}})
            conn.send({"id": 3, "op": "submit", "action": {"mode": "hang"}})
            until(b, lambda s: s["busy"] == 1 and s["cluster"]["waiting"] == 1)
            conn.send({"id": "c3", "op": "cancel", "target": 3})
            replies = {r["id"]: r for r in conn.receive_all(2)}
            assert replies[3]["error"]["code"] == "cancelled"
            until(b, lambda s: s["cluster"]["waiting"] == 0)
        assert b.stop() == 0
    finally:
        a.close()
        if b is not None:
            b.close()


def test_queue_full_past_max_queue_entries_waiting(
    short_tmp: Path, redis_session: RedisServer
) -> None:
    cluster = cluster_section(redis_session)
    a = node(short_tmp, "a", cluster, size=1, max_queue=5)
    try:
        with Connection(a.socket) as conn:
            busy_with_gate(conn, a, short_tmp / "never")
            action = {"mode": "pid"}
            conn.send(*({"id": i, "op": "submit", "action": action} for i in range(8)))
            replies = {r["id"]: r for r in conn.receive_all(3)}
            assert {r["error"]["code"] for r in replies.values()} == {"queue_full"}
            assert sorted(replies) == [5, 6, 7]
            length = redis_session.cli("XLEN", cluster["stream"])
            assert length == "6"  # the gate, taken, and five waiting: no MAXLEN trimmed any
    finally:
        a.close()


def test_the_node_configs_in_etc_are_valid() -> None:
    configs = [load_config(ROOT / "etc" / f"node-{name}.toml") for name in "ab"]
    assert [c.cluster.node for c in configs] == ["a", "b"]
    assert {c.cluster.url for c in configs} == {"redis://127.0.0.1:6379/0"}
    assert configs[0].server.socket != configs[1].server.socket


def test_a_stopping_node_puts_back_what_it_did_not_finish(
    short_tmp: Path, redis_session: RedisServer
) -> None:
    cluster = cluster_section(redis_session, claim_idle=1.0)
    gate, held = short_tmp / "gate", short_tmp / "held"
    a = node(short_tmp, "a", cluster, size=1)
    b: Daemon | None = None
    try:
        with Connection(a.socket) as conn:
            busy_with_gate(conn, a, gate)
            # B holds two: one running, one prefetched in its pool's queue (no more, for
            # actions this slow, whatever the cap: the third waits in the stream).
            b = node(short_tmp, "b", {**cluster, "prefetch": 8}, size=1, grace_period=0.2)
            action = {"mode": "wait_for", "path": str(held)}
            conn.send(*({"id": i, "op": "submit", "action": action} for i in range(3)))
            until(b, lambda s: s["cluster"]["held"] == 2 and s["cluster"]["waiting"] == 1)
            assert status(b)["busy"] == 1
            assert b.stop() == 0  # the grace period ends with both unfinished
            held.touch()
            gate.touch()
            replies = {r["id"]: r for r in conn.receive_all(4)}
            a_pid = status(a)["workers"][0]["pid"]
            assert [replies[i]["result"] for i in range(3)] == [a_pid] * 3
            # Put back as they were: no delivery counted, nothing dead.
            assert until(a, lambda s: s["cluster"]["pending"] == 0)["cluster"]["dead"] == 0
        assert a.stop() == 0
    finally:
        a.close()
        if b is not None:
            b.close()


def test_renewals_racing_the_replies_stop_nothing(
    short_tmp: Path, redis_session: RedisServer
) -> None:
    # Claims renewed every 33 ms while thousands of outcomes are pushed: a renewal that sees
    # an entry this node just answered must leave its finished job alone.
    cluster = cluster_section(redis_session, claim_idle=0.1, prefetch=64)
    a = node(short_tmp, "a", cluster, size=2)
    try:
        with Connection(a.socket) as conn:
            for start in range(0, 3000, 500):
                ids = range(start, start + 500)
                conn.send(*({"id": i, "op": "submit", "action": {"mode": "pid"}} for i in ids))
                replies = conn.receive_all(500)
                assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
            after = until(a, lambda s: s["cluster"]["held"] == 0)
            assert after["queued"] == 0
            assert after["outcomes"]["cancelled"] == 0
        assert a.stop() == 0
    finally:
        a.close()


def test_an_entry_too_deep_to_decode_gets_bad_request_and_the_node_carries_on(
    short_tmp: Path, redis_session: RedisServer
) -> None:
    """Anyone who can write to the stream is a client: an action nested 50,000 deep, added
    by hand, is answered `bad_request` on its reply list and costs the node nothing."""
    cluster = cluster_section(redis_session)
    a = node(short_tmp, "a", cluster, size=1)
    try:
        deep = "[" * 50_000 + "]" * 50_000
        stream = cluster["stream"]
        redis_session.cli("XADD", stream, "*", "action", deep, "reply_to", "deep:r", "tag", "t1")
        reply = redis_session.cli("BLPOP", "deep:r", "8").split("\n")
        assert reply[0] == "deep:r", reply
        answer = json.loads(reply[1])
        assert answer["tag"] == "t1"
        assert answer["ok"] is False
        assert answer["error"]["code"] == "bad_request", answer
        with Connection(a.socket) as conn:
            ok = conn.request({"id": 1, "op": "submit", "action": {"mode": "pid"}})
        assert ok["ok"] is True, ok
        assert a.proc.poll() is None
    finally:
        a.close()
