"""Many nodes on one Redis stream (SPEC 11): real daemons on a real redis-server.

Every test that starts daemons waits on their handshakes, log events and answers (never on
sleeps), has a deadline through the harness's timeouts, and leaves no process behind
(`no_orphans`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qoper8d.config import load_config
from qoper8d.errors import ConfigError
from tests.harness import ROOT, Connection, Daemon, base_config
from tests.redis_fixtures import RedisServer, cluster_section


def node(tmp: Path, name: str, cluster: dict[str, Any], **pool: Any) -> Daemon:
    """A daemon called `name` in its own directory under `tmp`, on `cluster`."""
    directory = tmp / name
    directory.mkdir(mode=0o700, exist_ok=True)
    config = base_config(directory, cluster={**cluster, "node": name}, pool=pool)
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
    cluster = cluster_section(redis_session)
    gate = short_tmp / "gate"
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
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        a.close()
        if b is not None:
            b.close()
