"""Under systemd: readiness, STATUS= and STOPPING=1, the watchdog, socket activation, and the
variables no worker may inherit, against real processes and a NOTIFY_SOCKET the test binds.

The daemon is started the way systemd starts a service: a `sh` that puts the socket on fd 3,
sets LISTEN_PID to its own pid and execs Python, so the pid systemd names is the daemon's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio

from qoper8d import PoolConfig, open_pool
from qoper8d._systemd import SYSTEMD_VARIABLES, Notifier, listen_socket, serve_watchdog
from qoper8d.cli import EXIT_SOCKET
from qoper8d.pool import check_handlers
from tests import harness
from tests.harness import ROOT, Connection, base_config

Message = dict[str, str]

#: A handler module written into the test's directory: `"environ"` returns the names of the
#: worker's environment variables, anything else kills the worker; `setup()` fails while a
#: file `broken` sits next to the module.
HANDLER = """
import os
import pathlib

BROKEN = pathlib.Path(__file__).with_name("broken")


def setup():
    if BROKEN.exists():
        raise RuntimeError("setup fails on purpose")


def handle(action):
    if action == "environ":
        return sorted(os.environ)
    os._exit(1)
"""

#: fd 0 (the socket the test passes as stdin) becomes fd 3, as systemd passes it; the pids
#: systemd names are the shell's, which execs the daemon.
ACTIVATE = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ WATCHDOG_PID=$$ exec "$@"'


def write_handler(directory: Path) -> dict[str, Any]:
    (directory / "sd_handler.py").write_text(HANDLER)
    return {"handler": "sd_handler:handle", "handler_path": [str(directory)]}


class Service(harness.Daemon):
    """`harness.Daemon` started as systemd would: `env` on top of ours and NOTIFY_SOCKET;
    with `listener`, that socket handed over as fd 3 (LISTEN_FDS=1, LISTEN_PID its pid);
    `prefix` execs the daemon (`systemd-socket-activate ...`)."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, Any],
        env: dict[str, str],
        listener: socket.socket | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "qoper8.toml"
        self.config_path.write_text(tomli_w.dumps(config))
        self.socket = Path(config["server"]["socket"])
        self.events = []
        self.lines = []
        self._changed = threading.Condition()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(tmp / "notify"))
        env = {**os.environ, **env, "NOTIFY_SOCKET": str(tmp / "notify")}
        command = [*prefix, sys.executable, "-m", "qoper8d", "--config", str(self.config_path)]
        if listener is not None:
            env.update(LISTEN_FDS="1", LISTEN_FDNAMES="qoper8d.socket")
            command = ["sh", "-c", ACTIVATE, "sh", *command]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL if listener is None else listener.fileno(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()

    def notifications(self, until: str, timeout: float = 20.0) -> list[Message]:
        """The daemon's notifications up to and including the first with a field that starts
        like `until` (`READY=1`, `STATUS=degraded`), each as its fields."""
        self._notify.settimeout(0.5)
        deadline = time.monotonic() + timeout
        messages: list[Message] = []
        while time.monotonic() < deadline:
            try:
                raw = self._notify.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    break
                continue
            fields = dict(line.split("=", 1) for line in raw.split("\n"))
            messages.append(fields)
            name, _, value = until.partition("=")
            if fields.get(name, "\0").startswith(value):
                return messages
        raise AssertionError(f"no {until} in {messages[-5:]}; log:\n" + "\n".join(self.lines[-15:]))


def test_socket_activation_serves_the_socket_as_handed_over(short_tmp: Path) -> None:
    # The socket as a socket unit makes it: bound and listening before the daemon exists,
    # with modes the daemon would never give one of its own (so a chmod would show).
    path = short_tmp / "activated.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(16)
        os.chmod(path, 0o640)
        before = os.stat(path)
        config = base_config(short_tmp, pool=write_handler(short_tmp))
        service = Service(short_tmp, config, {"WATCHDOG_USEC": "30000000"}, listener)
        try:
            starting, *_, ready = service.notifications(until="READY=1")
            assert starting == {"STATUS": "starting 2 workers"}
            assert ready["MAINPID"] == str(service.proc.pid)
            assert ready["STATUS"].startswith("serving: 2 workers")
            with open(f"/proc/{service.proc.pid}/environ", "rb") as f:
                given = {entry.partition(b"=")[0].decode() for entry in f.read().split(b"\0")}
            with Connection(path) as c:
                status = c.request({"id": 1, "op": "status"})["result"]
                assert status["daemon"]["socket"] == str(path)
                keys = c.request({"id": 2, "op": "submit", "action": "environ"})["result"]
                assert c.request({"id": 3, "op": "reload"})["ok"]
            # Every systemd variable reached the master; none reached a worker.
            assert given >= SYSTEMD_VARIABLES
            assert SYSTEMD_VARIABLES.isdisjoint(keys)
            assert "PATH" in keys
            # RELOADING=1 then READY=1 (a watchdog ping may come in between).
            reloading = service.notifications(until="READY=1")[:-1]
            assert [m["RELOADING"] for m in reloading if "RELOADING" in m] == ["1"]
            assert all(int(m["MONOTONIC_USEC"]) > 0 for m in reloading if "RELOADING" in m)
            assert service.stop() == 0
            assert service.notifications(until="STOPPING=1")
        finally:
            service.close()
        # Never locked against, bound, chmod-ed or unlinked: the file is the one we made,
        # and server.socket's path was never touched.
        after = os.stat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        assert not service.socket.exists()
        assert not Path(f"{service.socket}.lock").exists()
        # Still listening for the next daemon: a client now waits in the backlog.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="no systemd here")
def test_systemds_own_socket_activation(short_tmp: Path) -> None:
    """The same through the tool systemd ships, which sets the variables its own way."""
    path = short_tmp / "activated.sock"
    # Its children get no environment but what it is told to pass.
    activate = ("systemd-socket-activate", "--listen", str(path), "--setenv=NOTIFY_SOCKET")
    service = Service(short_tmp, base_config(short_tmp), {}, prefix=activate)
    try:
        # It execs the daemon only once a client knocks: the client waits in the backlog.
        with service._changed:
            assert service._changed.wait_for(
                lambda: any("Listening" in x for x in service.lines), 20
            )
        with Connection(path) as c:
            service.notifications(until="READY=1")
            ok = {"mode": "ok"}
            assert c.request({"id": 1, "op": "submit", "action": ok})["result"] == ok
        assert service.stop() == 0
    finally:
        service.close()
    assert path.exists()
    assert not service.socket.exists()


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        (socket.SOCK_STREAM, "is not listening"),
        (socket.SOCK_DGRAM, "is a SOCK_DGRAM socket"),
    ],
)
def test_a_handed_over_descriptor_that_cannot_serve_stops_the_start(
    short_tmp: Path, kind: int, why: str
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    service = Service(short_tmp, base_config(short_tmp), {}, theirs)
    try:
        assert service.wait(30) == EXIT_SOCKET
        event = service.wait_event("daemon.socket_unusable")
        assert why in event["error"]
        assert "fd 3" in event["error"]
        assert not service.socket.exists()
    finally:
        service.close()
        ours.close()
        theirs.close()


def test_variables_for_another_pid_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "HOME": "/"}
    assert listen_socket(env) is None
    env.update(NOTIFY_SOCKET="@qoper8-test", WATCHDOG_USEC="1000000", WATCHDOG_PID="1")
    notifier = Notifier.from_environ(env)
    assert notifier.enabled
    assert notifier.watchdog is None
    notifier.close()
    assert env == {"HOME": "/"}


def test_the_watchdog_is_fed_while_the_pool_is_degraded(short_tmp: Path) -> None:
    config = base_config(
        short_tmp,
        pool=write_handler(short_tmp),
        supervisor={"backoff_initial": 0.05, "backoff_max": 0.1, "max_restarts": 10000},
    )
    service = Service(short_tmp, config, {"WATCHDOG_USEC": "200000"})  # a ping every 0.1 s
    try:
        service.notifications(until="READY=1")
        assert service.notifications(until="WATCHDOG=1")
        # Every worker dies, and every replacement's setup() fails, over and over.
        (short_tmp / "broken").touch()
        with Connection(service.socket) as c:
            c.send(*({"id": i, "op": "submit", "action": "die"} for i in range(2)))
            assert {c.receive()["error"]["code"] for _ in range(2)} == {"worker_lost"}  # type: ignore[index]
        service.notifications(until="STATUS=degraded: 0 of 2 workers serving")
        # The pings go on, however long the pool stays that way.
        for failures in (4, 8):
            service.wait_count("worker.start_failed", failures)
            service.notifications(until="WATCHDOG=1")
        assert service.stop() == 0
        stopping = service.notifications(until="STOPPING=1")[-1]
        assert stopping["STATUS"].startswith("stopping")
    finally:
        service.close()


async def test_a_wedged_event_loop_sends_no_ping(short_tmp: Path) -> None:
    """The pings come from trio tasks, not a thread: while the loop is blocked, none goes."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(short_tmp / "notify"))
    receiver.setblocking(False)
    notifier = Notifier(str(short_tmp / "notify"), watchdog=0.1)
    with trio.fail_after(20), receiver:
        async with (
            open_pool(**write_handler(short_tmp), size=1) as pool,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(serve_watchdog, notifier, pool.heartbeat, lambda: "ok")
            await trio.lowlevel.wait_readable(receiver)
            while _pending(receiver):  # no checkpoint from here to the end of the wedge
                pass
            time.sleep(0.3)  # noqa: ASYNC251 -- the wedge: the loop blocked for six ping periods
            assert not _pending(receiver)
            await trio.lowlevel.wait_readable(receiver)
            assert receiver.recv(4096) == b"WATCHDOG=1"
            nursery.cancel_scope.cancel()
    notifier.close()


def _pending(sock: socket.socket) -> bool:
    """Whether a datagram was waiting (and is now read)."""
    try:
        sock.recv(4096)
    except BlockingIOError:
        return False
    return True


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
async def test_open_pool_workers_never_see_systemds_variables(
    short_tmp: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SYSTEMD_VARIABLES:
        monkeypatch.setenv(name, "1")
    with trio.fail_after(20):
        async with open_pool(**write_handler(short_tmp), size=1, start_method=method) as pool:
            keys = await pool.run("environ")
    assert SYSTEMD_VARIABLES.isdisjoint(keys)
    assert "PATH" in keys


def test_check_configs_throwaway_worker_never_sees_them(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (short_tmp / "sd_check.py").write_text(
        "import os\n"
        f"def setup():\n    assert not os.environ.keys() & set({sorted(SYSTEMD_VARIABLES)})\n"
        "def handle(action):\n    return action\n"
    )
    for name in SYSTEMD_VARIABLES:
        monkeypatch.setenv(name, "1")
    config = PoolConfig(handler="sd_check:handle", handler_path=[str(short_tmp)])
    assert check_handlers(config) == []


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_the_unit_files_verify(tmp_path: Path) -> None:
    for name in ("qoper8d.service", "qoper8d.socket"):
        text = (ROOT / "etc" / name).read_text()
        # verify wants ExecStart= to exist: the qoper8d installed next to this Python.
        text = text.replace(
            "/opt/qoper8d/bin/qoper8d", str(Path(sys.executable).parent / "qoper8d")
        )
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "qoper8d.socket", "qoper8d.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for an unknown key or a value it cannot parse: it only says so.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_readme_shows_the_units_as_they_are() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Running under systemd") :]
    excerpt = section[
        section.index("```ini\n") + 7 : section.index("\n```\n", section.index("```ini"))
    ]
    unit = ""
    for line in excerpt.splitlines():
        if line.startswith("# "):
            unit = (ROOT / "etc" / line[2:]).read_text()
        elif line:
            assert line in unit.splitlines(), line


def test_an_abstract_notify_socket_gets_one_bounded_status_line() -> None:
    name = f"qoper8-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        notifier = Notifier("@" + name)
        assert notifier.notify("READY=1", status="a line\nand another " + "x" * 500)
        fields = receiver.recv(4096).decode().split("\n")
        notifier.close()
    assert fields[0] == "READY=1"
    assert fields[1].startswith("STATUS=a line and another xxx")
    assert fields[1].endswith("...")
    assert len(fields[1].removeprefix("STATUS=").encode()) == 200
