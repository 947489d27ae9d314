"""The cluster's less travelled paths (SPEC 11), on real daemons and real redis-servers:
an idle node's own submits run and answered in process, progress over the reply path, a
client's disconnect across nodes, replies of a submitter that died, the capped dead stream,
entries written by hand, a submit in doubt, and Redis without BLMPOP (6.2).

As in test_cluster.py: handshakes, log events and answers to wait on (a poll with a
deadline only where Redis's own clock decides, as for an expiry), no process left behind.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qoper8d import _streams
from tests.harness import Connection, Daemon
from tests.redis_fixtures import RedisServer, _short_dir, cluster_section
from tests.test_cluster import busy_with_gate, node, status, until

PROGRESS = "handlers.progress:handle"


@pytest.fixture
def start_node(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """Starts a node of the test's cluster in `short_tmp` (`node`'s arguments after it), and
    closes each one after the test, whatever it did (a test's nodes start one after another,
    some only once the first is busy)."""
    daemons: list[Daemon] = []

    def start(name: str, cluster: dict[str, Any], **pool: Any) -> Daemon:
        daemons.append(node(short_tmp, name, cluster, **pool))  # `server=` too
        return daemons[-1]

    yield start
    for daemon in daemons:
        daemon.close()


def wait_for_redis(server: RedisServer, check: str, *args: str, expect: str) -> None:
    """Until redis-cli `args` prints `expect` (for what Redis's clock decides: an expiry)."""
    deadline = time.monotonic() + 20
    while (out := server.cli(*args)) != expect:
        assert time.monotonic() < deadline, f"{check}: {out!r}"
        time.sleep(0.05)


def test_progress_travels_the_reply_path_to_the_submitting_node(
    short_tmp: Path, redis_session: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    cluster = cluster_section(redis_session, claim_idle=0.6)
    gate, held = short_tmp / "gate", short_tmp / "held"
    a = start_node("a", cluster, size=1, handler=PROGRESS)
    with Connection(a.socket) as conn:
        # A's one worker runs a submit that reports progress but did not ask for it.
        steps = {"mode": "steps", "path": str(gate)}
        conn.send({"id": "gate", "op": "submit", "action": steps})
        until(a, lambda s: s["busy"] == 1)
        b = start_node("b", cluster, size=1, handler=PROGRESS)
        steps = {"mode": "steps", "path": str(held)}
        conn.send({"id": "p", "op": "submit", "action": steps, "progress": True})
        assert conn.receive() == {"id": "p", "progress": "started"}
        assert status(b)["busy"] == 1  # run on B, reported through A's reply list
        held.touch()
        assert conn.receive() == {"id": "p", "progress": "ending"}
        assert conn.receive() == {"id": "p", "ok": True, "result": "done"}
        gate.touch()
        # The submit that did not ask sees its answer and nothing before it.
        assert conn.receive() == {"id": "gate", "ok": True, "result": "done"}
    assert a.stop() == 0
    assert b.stop() == 0


def test_an_idle_node_runs_its_own_submits_and_answers_them_itself(
    short_tmp: Path, redis_session: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    # A worker each and a prefetch of 1: an idle node's feeder leaves one entry's room to
    # its own clients, which its intake's call takes with their submits.
    cluster = cluster_section(redis_session, claim_idle=0.6, prefetch=1)
    stream = cluster["stream"]
    a = start_node("a", cluster, size=1)
    b = start_node("b", cluster, size=1, handler=PROGRESS)
    pids = [w["pid"] for w in status(a)["workers"]]
    with Connection(a.socket) as conn:
        for i in range(20):
            reply = conn.request({"id": i, "op": "submit", "action": {"mode": "pid"}})
            assert reply["ok"], reply
            assert reply["result"] in pids, f"run on the other node: {reply}"
    with Connection(b.socket) as conn:
        # Its progress and its answer go straight to the client, in their order.
        steps = {"mode": "steps", "path": str(short_tmp / "gate")}
        conn.send({"id": "p", "op": "submit", "action": steps, "progress": True})
        assert conn.receive() == {"id": "p", "progress": "started"}
        assert status(b)["busy"] == 1
        assert status(a)["busy"] == 0
        (short_tmp / "gate").touch()
        assert conn.receive() == {"id": "p", "progress": "ending"}
        assert conn.receive() == {"id": "p", "ok": True, "result": "done"}
    # Each entry acknowledged and deleted all the same (after its answer); no reply, and no
    # progress report, went through a reply list.
    wait_for_redis(redis_session, "acknowledged", "XLEN", stream, expect="0")
    assert redis_session.cli("XPENDING", stream, stream).split("\n")[0] == "0"
    for name in "ab":
        assert redis_session.cli("EXISTS", f"{stream}:reply:{name}") == "0"
    assert a.stop() == 0
    assert b.stop() == 0


def test_actions_of_every_size_class_cross_the_scripts_intact(
    redis_session: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    # The scripts take a batch as one msgpack argument, its header by length: strings on each
    # side of the 32, 256 and 65,536 byte steps, text that is not ASCII, and batches of more
    # than 15 entries (pipelined), run here and on the other node (through its reply list).
    cluster = cluster_section(redis_session, prefetch=4)
    a = start_node("a", cluster, size=1)
    b = start_node("b", cluster, size=1)
    # The action field is the action's JSON: 20 bytes around the string.
    sizes = [0, 11, 12, 13, 235, 236, 237, 65515, 65516, 65517, 200_000]
    texts = ["x" * n for n in sizes] + ["é" * 40, "\u2603" * 30_000, '"\\\n{']
    with Connection(a.socket) as conn:
        sent = {}
        for i in range(300):
            action = {"mode": "ok", "s": texts[i % len(texts)]}
            sent[i] = action
            conn.send({"id": i, "op": "submit", "action": action})
        for reply in conn.receive_all(len(sent)):
            assert reply["ok"], str(reply)[:300]
            assert reply["result"] == sent[reply["id"]], reply["id"]
    assert until(a, lambda s: s["cluster"]["pending"] == 0)["restarts"] == 0
    assert a.stop() == 0
    assert b.stop() == 0


def test_a_call_carries_at_most_call_bytes_of_actions_and_results(
    redis_own: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    # Redis here takes no argument longer than CALL_BYTES + 1 MiB: 40 actions of 900 kB
    # waiting at once (36 MB), and their results as long, go in calls of at most that.
    limit = (_streams.CALL_BYTES >> 20) + 1
    redis_own.cli("CONFIG", "SET", "proto-max-bulk-len", f"{limit}mb")
    cluster = cluster_section(redis_own, prefetch=8)
    a = start_node("a", cluster, size=1)
    b = start_node("b", cluster, size=1)
    with Connection(a.socket) as conn:
        # Sent from a thread while this one reads: the node stops reading a client that
        # leaves its answers unread past server.max_unsent_bytes.
        actions = [{"mode": "ok", "s": f"{i:02}" * 450_000} for i in range(40)]
        sends = [{"id": i, "op": "submit", "action": action} for i, action in enumerate(actions)]

        def send_all() -> None:
            for request in sends:
                conn.send(request)

        sender = threading.Thread(target=send_all)
        # Redis holds the node's first call until all 40 wait in its intake for the next.
        redis_own.cli("CLIENT", "PAUSE", "30000", "WRITE")
        sender.start()
        until(a, lambda s: s["cluster"]["awaiting"] == len(sends))
        redis_own.cli("CLIENT", "UNPAUSE")
        for reply in conn.receive_all(len(actions)):
            assert reply["ok"], str(reply)[:300]
            assert reply["result"] == actions[reply["id"]], reply["id"]
        sender.join()
    # Nothing refused (a second node's group creation and a script's first call aside).
    errors = [line.split(":")[0] for line in redis_own.cli("INFO", "errorstats").splitlines()]
    assert set(errors[1:]) <= {"errorstat_BUSYGROUP", "errorstat_NOSCRIPT"}, errors
    assert until(a, lambda s: s["cluster"]["pending"] == 0)["restarts"] == 0
    assert a.stop() == 0
    assert b.stop() == 0


def protocol_errors(server: RedisServer) -> int:
    """How many commands `server` refused with an error beginning "ERR" (a protocol error,
    for a command with an argument past its proto-max-bulk-len, is one)."""
    for line in server.cli("INFO", "errorstats").splitlines():
        if line.startswith("errorstat_ERR:"):
            return int(line.partition("count=")[2].split(",")[0])
    return 0


def test_replies_too_long_for_this_redis_go_in_shorter_calls_or_end_bad_result(
    short_tmp: Path, redis_own: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    # proto-max-bulk-len lowered by hand to 1 MiB, its least: Redis refuses any call with a
    # longer argument, and would refuse the same call for ever. Replies of 600 kB that pile
    # up go in shorter calls; one of 1.5 MB cannot go at all, and its submitter gets
    # bad_result, not a reply retried for ever (which held up every reply behind it).
    redis_own.cli("CONFIG", "SET", "proto-max-bulk-len", "1mb")
    cluster = cluster_section(redis_own)
    gate_a, gate_b = short_tmp / "gate-a", short_tmp / "gate-b"
    a = start_node("a", cluster, size=1)
    b = start_node("b", cluster, size=3)
    with Connection(a.socket) as conn:
        busy_with_gate(conn, a, gate_a)  # so that B runs what A's client submits
        action = {"mode": "wait_for", "path": str(gate_b), "bytes": 600_000}
        for i in range(3):
            conn.send({"id": i, "op": "submit", "action": action})
        until(b, lambda s: s["busy"] == 3)
        # Redis holds B's first reply until the other two wait for the next call.
        redis_own.cli("CLIENT", "PAUSE", "30000", "WRITE")
        gate_b.touch()
        until(b, lambda s: s["outcomes"]["result"] == 3)
        redis_own.cli("CLIENT", "UNPAUSE")
        for reply in conn.receive_all(3):
            assert reply["ok"], str(reply)[:300]
            assert reply["result"] == "x" * 600_000
        refused = protocol_errors(redis_own)
        assert refused >= 1  # the two replies in one call
        conn.send({"id": "big", "op": "submit", "action": {"mode": "big", "bytes": 1_500_000}})
        (big,) = conn.receive_all(1)
        assert big["id"] == "big"
        assert big["error"]["code"] == "bad_result", big
        assert "proto-max-bulk-len" in big["error"]["message"]
        assert protocol_errors(redis_own) == refused + 1
        gate_a.touch()
        assert conn.receive()["id"] == "gate"  # type: ignore[index]
    assert until(b, lambda s: s["cluster"]["pending"] == 0)["restarts"] == 0
    assert a.stop() == 0
    assert b.stop() == 0


def test_submits_too_long_for_this_redis_go_in_shorter_calls_or_are_refused(
    redis_own: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    # The same Redis, the other way: submits that pile up while one call is held go in
    # shorter calls; one longer than Redis takes (server.max_message_bytes allows 4 MiB) is
    # answered unavailable, not in doubt (Redis ran nothing of a call it refused so), and
    # none of the others is.
    redis_own.cli("CONFIG", "SET", "proto-max-bulk-len", "1mb")
    server = {"max_message_bytes": 4 << 20}
    a = start_node("a", cluster_section(redis_own), size=1, server=server)
    actions = [{"mode": "ok", "s": f"{i}" * 400_000} for i in range(6)]
    actions.insert(3, {"mode": "ok", "s": "x" * 1_200_000})
    with Connection(a.socket) as conn:
        redis_own.cli("CLIENT", "PAUSE", "30000", "WRITE")
        for i, action in enumerate(actions):
            conn.send({"id": i, "op": "submit", "action": action})
        until(a, lambda s: s["cluster"]["awaiting"] == len(actions))
        redis_own.cli("CLIENT", "UNPAUSE")
        replies = {reply["id"]: reply for reply in conn.receive_all(len(actions))}
    for i, action in enumerate(actions):
        if i == 3:
            error = replies[i]["error"]
            assert error["code"] == "unavailable"
            assert "proto-max-bulk-len" in error["message"]
            assert not error.get("in_doubt"), error
        else:
            assert replies[i]["ok"], str(replies[i])[:300]
            assert replies[i]["result"] == action
    assert protocol_errors(redis_own) >= 2  # the pile, then the long one alone
    assert a.stop() == 0


def test_a_disconnect_withdraws_what_no_node_took_and_lets_the_rest_finish(
    short_tmp: Path, redis_session: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    cluster = cluster_section(redis_session, claim_idle=0.6)  # status fresh every 0.2 s
    gate_a, gate_b, held = short_tmp / "gate-a", short_tmp / "gate-b", short_tmp / "held"
    record = short_tmp / "record"
    a = start_node("a", cluster, size=1)
    with Connection(a.socket) as conn_a:
        busy_with_gate(conn_a, a, gate_a)
        b = start_node("b", cluster, size=1)
        with Connection(b.socket) as conn_b:
            busy_with_gate(conn_b, b, gate_b)
            # Both nodes busy: a submit of B's client waits in the stream, not taken.
            with Connection(b.socket) as gone:
                action = {"mode": "pid", "record": str(record), "id": "waiting"}
                gone.send({"id": 1, "op": "submit", "action": action})
                until(b, lambda s: s["cluster"]["waiting"] == 1)
            # Its client gone, its entry is removed from the shared stream.
            until(b, lambda s: s["cluster"]["waiting"] == 0)
            gate_b.touch()
            assert conn_b.receive()["id"] == "gate"  # type: ignore[index]
        # One that B runs for a client of A: its client gone, it runs to its end.
        with Connection(a.socket) as gone:
            action = {"mode": "wait_for", "path": str(held), "record": str(record)}
            gone.send({"id": 2, "op": "submit", "action": {**action, "id": "running"}})
            until(b, lambda s: s["busy"] == 1)
        held.touch()
        until(b, lambda s: s["outcomes"]["result"] == 2)
        gate_a.touch()
        assert conn_a.receive()["id"] == "gate"  # type: ignore[index]
        assert conn_a.request({"id": 3, "op": "submit", "action": {"mode": "pid"}})["ok"]
        assert record.read_text().split() == ["running"]
        # Its reply came to A for a submit nobody waits for: dropped, the list emptied.
        assert redis_session.cli("LLEN", f"{cluster['stream']}:reply:a") == "0"
    assert a.stop() == 0
    assert b.stop() == 0


def test_the_replies_of_a_submitter_that_died_expire(
    short_tmp: Path, redis_session: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    cluster = cluster_section(redis_session, claim_idle=0.5, result_ttl=2.0)
    gate, held = short_tmp / "gate", short_tmp / "held"
    a = start_node("a", cluster, size=1)
    with Connection(a.socket) as conn:
        busy_with_gate(conn, a, gate)
        b = start_node("b", cluster, size=1)
        conn.send({"id": 1, "op": "submit", "action": {"mode": "wait_for", "path": str(held)}})
        until(b, lambda s: s["busy"] == 1)
    a.kill()  # the submitter dies; B runs its entry, then takes over the gate's
    held.touch()
    gate.touch()
    until(b, lambda s: s["outcomes"]["result"] == 2, timeout=30)
    replies = f"{cluster['stream']}:reply:a"
    assert redis_session.cli("LLEN", replies) == "2"  # unread: nobody is left to read
    assert 0 < int(redis_session.cli("PTTL", replies)) <= 2000
    wait_for_redis(redis_session, "the replies expire", "EXISTS", replies, expect="0")
    assert b.stop() == 0


def test_the_dead_stream_is_capped(redis_session: RedisServer) -> None:
    # The takeover script, as nodes run it, poisoning 12,000 entries delivered once too often:
    # the dead stream keeps about DEAD_MAXLEN of them (the newest), not all.
    s = f"dead{time.monotonic_ns()}"
    fill = """
    redis.call('XGROUP', 'CREATE', KEYS[1], KEYS[1], '$', 'MKSTREAM')
    for i = 1, tonumber(ARGV[1]) do
      redis.call('XADD', KEYS[1], '*', 'action', '1', 'reply_to', '', 'tag', 't' .. i)
    end
    redis.call('XREADGROUP', 'GROUP', KEYS[1], 'gone', 'COUNT', ARGV[1], 'STREAMS', KEYS[1], '>')
    return 0
    """
    redis_session.cli("EVAL", fill, "1", s, "12000")
    cap = _streams.DEAD_MAXLEN
    args = [s, "me", "0", "12000", "1", str(cap), "1000", str(_streams.REPLY_MAXLEN)]
    out = redis_session.cli("EVAL", _streams.RECLAIM.decode(), "2", s, f"{s}:dead", *args)
    assert out.split("\n")[-2:] == ["12000", "0"], out[-200:]  # all poisoned, none taken
    dead = int(redis_session.cli("XLEN", f"{s}:dead"))
    assert cap <= dead < cap + 200, dead  # MAXLEN ~: whole nodes of 100 entries go
    assert redis_session.cli("XLEN", s) == "0"
    newest = redis_session.cli("XREVRANGE", f"{s}:dead", "+", "-", "COUNT", "1")
    assert "t12000" in newest.split("\n")


def test_entries_written_by_hand_that_cannot_run_get_bad_request(
    redis_session: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    cluster = cluster_section(redis_session)
    a = start_node("a", cluster, size=1)
    stream = cluster["stream"]
    wrong = {  # each entry's fields besides reply_to and its tag
        "no-action": [],
        "not-json": ["action", "{"],
        "not-utf8": ["action", '"\udcff"'],
        "timeout-text": ["action", "1", "timeout", "soon"],
        "timeout-negative": ["action", "1", "timeout", "-1"],
        "timeout-nan": ["action", "1", "timeout", "nan"],
        "attempts-zero": ["action", "1", "max_attempts", "0"],
        "attempts-text": ["action", "1", "max_attempts", "x"],
    }
    for tag, fields in wrong.items():
        redis_session.cli("XADD", stream, "*", *fields, "reply_to", "hand:r", "tag", tag)
    answers = {}
    for _ in wrong:
        reply = redis_session.cli("BLPOP", "hand:r", "10").split("\n")
        assert reply[0] == "hand:r", reply
        answer = json.loads(reply[1])
        answers[answer["tag"]] = answer
    assert sorted(answers) == sorted(wrong)
    for tag, answer in answers.items():
        assert answer["ok"] is False, answer
        assert answer["error"]["code"] == "bad_request", (tag, answer)
    # The node and its worker carry on, and nothing is left pending in the stream.
    with Connection(a.socket) as conn:
        ok = conn.request({"id": 1, "op": "submit", "action": {"mode": "pid"}})
        assert ok["ok"] is True, ok
        assert until(a, lambda s: s["cluster"]["pending"] == 0)["restarts"] == 0
    assert a.stop() == 0


def test_a_submit_in_flight_when_redis_dies_is_answered_in_doubt(
    redis_own: RedisServer, start_node: Callable[..., Daemon]
) -> None:
    cluster = cluster_section(redis_own, claim_idle=1.0)
    a = start_node("a", cluster, size=1)
    with Connection(a.socket) as conn:
        assert conn.request({"id": 0, "op": "submit", "action": {"mode": "pid"}})["ok"]
        # Redis holds every write back: the node's script call adding the submit waits.
        redis_own.cli("CLIENT", "PAUSE", "60000", "WRITE")
        conn.send({"id": 1, "op": "submit", "action": {"mode": "pid"}})
        # The status answer comes after the submit was taken (one connection, in order).
        assert conn.request({"id": "s", "op": "status"})["ok"]
        redis_own.kill()
        answer = conn.receive()
        assert answer is not None
        assert answer["id"] == 1
        assert answer["error"]["code"] == "unavailable", answer
        assert answer["error"]["in_doubt"] is True, answer
        redis_own.start()
        until(a, lambda s: s["cluster"]["connected"], timeout=30)
        assert conn.request({"id": 2, "op": "submit", "action": {"mode": "pid"}})["ok"]
    assert a.stop() == 0


def test_a_node_on_redis_without_blmpop_reads_its_replies_with_blpop(short_tmp: Path) -> None:
    # Redis 6.2 has no BLMPOP: this server hides it, so the node must take the other way.
    server = RedisServer(_short_dir(), extra=("--rename-command", "BLMPOP", "qoper8-hidden"))
    a: Daemon | None = None
    try:
        a = node(short_tmp, "a", cluster_section(server, claim_idle=1.0), size=2)
        with Connection(a.socket) as conn:
            conn.send(*({"id": i, "op": "submit", "action": {"mode": "pid"}} for i in range(50)))
            replies = conn.receive_all(50)
            assert sorted(r["id"] for r in replies) == list(range(50))
            assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
        assert not a.of("cluster.redis_error")
        stats = server.cli("INFO", "commandstats")
        assert "cmdstat_blpop:calls=" in stats, stats  # the replies were taken this way
        assert a.stop() == 0
    finally:
        if a is not None:
            a.close()
        server.close()
