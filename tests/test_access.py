"""Who gets in: the socket's file permissions, the peer's uid, and an unsafe socket directory.

Another user is played by uid 65534 through `setpriv`. The tests run as root, and /root (where
the interpreter lives) is 0700, so that user needs a capability just to start Python:

* `dac_override` also lets it past the socket's own permissions, so the daemon's SO_PEERCRED
  check is what stands in its way: one `forbidden` line, then end-of-file — unless
  `server.allowed_uids` names it;
* `dac_read_search` lets it start Python but not write to the socket: the filesystem already
  keeps it out (EACCES), whatever `allowed_uids` says.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qoper8d.cli import EXIT_SOCKET
from tests.harness import Connection, Daemon, base_config, running_daemon

pytestmark = pytest.mark.timeout(60)

OTHER_UID = 65534
SETPRIV = shutil.which("setpriv")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
needs_setpriv = pytest.mark.skipif(
    SETPRIV is None, reason="setpriv (util-linux) is needed to run a client as another uid"
)

# Runs as the other user: connect, say hello, report every line until the answer or EOF.
CLIENT = r"""
import json, os, socket, sys
report = {"uid": os.getuid(), "lines": [], "eof": False, "connect_errno": None}
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    report["connect_errno"] = exc.errno
else:
    try:
        sock.sendall(b'{"id": 1, "op": "hello"}\n')
    except OSError:
        pass  # refused already: read what it said
    reader = sock.makefile("rb")
    while True:
        try:
            line = reader.readline()
        except ConnectionResetError:
            line = b""
        if not line:
            report["eof"] = True
            break
        report["lines"].append(json.loads(line))
        if report["lines"][-1].get("id") == 1:
            break
print(json.dumps(report))
"""


def as_other_user(socket_path: Path, capability: str) -> dict[str, Any]:
    assert SETPRIV is not None
    done = subprocess.run(
        [
            SETPRIV,
            f"--reuid={OTHER_UID}",
            f"--regid={OTHER_UID}",
            "--clear-groups",
            f"--inh-caps=+{capability}",
            f"--ambient-caps=+{capability}",
            # The interpreter running the tests, as the daemon does (harness.py): another
            # user can run it, where a checkout's private files may not be readable.
            sys.executable,
            "-I",
            "-c",
            CLIENT,
            str(socket_path),
        ],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["uid"] == OTHER_UID
    return report


@needs_root
@needs_setpriv
@pytest.mark.parametrize("allowed", [False, True], ids=["not_allowed", "allowed_uids"])
def test_another_uid_is_refused_unless_allowed(short_tmp: Path, allowed: bool) -> None:
    path = short_tmp / "run" / "q.sock"
    server: dict[str, Any] = {"socket": str(path)}
    if allowed:
        server["allowed_uids"] = [OTHER_UID]
    with running_daemon(short_tmp, server=server) as d:
        # What the other user has to get past first.
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        report = as_other_user(path, "dac_override")
        assert report["connect_errno"] is None
        if allowed:
            (hello,) = report["lines"]
            assert hello["ok"] is True, hello
            assert hello["result"]["protocol"] == 1
            assert hello["result"]["pid"] == d.proc.pid
        else:
            assert report["lines"] == [
                {
                    "id": None,
                    "ok": False,
                    "error": {
                        "code": "forbidden",
                        "message": f"uid {OTHER_UID} may not use this socket (server.allowed_uids)",
                    },
                }
            ]
            assert report["eof"], "the connection is closed after the refusal"
            event = d.wait_event("control.forbidden")
            assert event["uid"] == OTHER_UID
        with Connection(d.socket) as c:  # the daemon's own uid carries on
            status = c.request({"id": 1, "op": "status"})["result"]
            assert status["state"] == "running"
            assert status["daemon"]["connections"] == 1


@needs_root
@needs_setpriv
def test_the_filesystem_keeps_another_uid_out(short_tmp: Path) -> None:
    path = short_tmp / "run" / "q.sock"
    # Even a uid the daemon would accept cannot reach a socket it has no permission on.
    with running_daemon(short_tmp, server={"socket": str(path), "allowed_uids": [OTHER_UID]}):
        report = as_other_user(path, "dac_read_search")
        assert report["connect_errno"] == errno.EACCES, report


def refused(tmp: Path, socket_path: Path) -> str:
    """Start a daemon on `socket_path`; it must refuse with EXIT_SOCKET. Its error message."""
    daemon = Daemon(tmp, base_config(tmp, server={"socket": str(socket_path)}), ready=False)
    try:
        assert daemon.wait() == EXIT_SOCKET
        event = daemon.wait_event("daemon.socket_unusable")
    finally:
        daemon.close()
    message: str = event["error"]
    return message


def test_a_symlink_planted_at_the_socket_directory_is_refused(short_tmp: Path) -> None:
    real = short_tmp / "real"
    real.mkdir(mode=0o700)
    link = short_tmp / "run"
    link.symlink_to(real)
    message = refused(short_tmp, link / "q.sock")
    assert str(link) in message
    assert "symlink" in message
    assert list(real.iterdir()) == [], "nothing was created through the symlink"
    assert link.is_symlink()


@needs_root
def test_a_socket_directory_owned_by_another_uid_is_refused(short_tmp: Path) -> None:
    theirs = short_tmp / "run"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    message = refused(short_tmp, theirs / "q.sock")
    assert str(theirs) in message
    assert f"belongs to uid {OTHER_UID}" in message
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701], ids=oct)
def test_a_socket_directory_open_to_others_is_refused(short_tmp: Path, mode: int) -> None:
    shared = short_tmp / "run"
    shared.mkdir()
    shared.chmod(mode)
    message = refused(short_tmp, shared / "q.sock")
    assert str(shared) in message
    assert f"open to other users (mode {mode:o})" in message
    assert list(shared.iterdir()) == []
    assert stat.S_IMODE(os.stat(shared).st_mode) == mode, "the daemon changed nothing"
