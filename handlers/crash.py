"""Handlers that misbehave on purpose, one `"mode"` per way a worker can go wrong.

| action                               | what the handler does                              |
|--------------------------------------|----------------------------------------------------|
| `{"mode": "ok"}`                     | return the action (a well-behaved neighbour)       |
| `{"mode": "pid"}`                    | return the worker's pid                            |
| `{"mode": "exit", "code": 42}`       | `os._exit(code)`                                   |
| `{"mode": "sys_exit", "code": 3}`    | `raise SystemExit(code)`: the worker exits         |
| `{"mode": "sigkill"}`                | SIGKILL itself                                     |
| `{"mode": "sigsegv"}`                | a real segmentation fault (reads address 0)        |
| `{"mode": "raise", "message": m}`    | `raise ValueError(m)`: the worker survives         |
| `{"mode": "hang"}`                   | sleep for ever                                     |
| `{"mode": "ignore_term"}`            | ignore SIGTERM, then sleep for ever                |
| `{"mode": "spin"}`                   | burn CPU for ever                                  |
| `{"mode": "flood", "lines": n}`      | print n lines to stdout, return n                  |
| `{"mode": "flood_until", "path": p}` | print lines until file p exists, return the count  |
| `{"mode": "flood_raw", "bytes": n}`  | write n bytes of invalid UTF-8 to fd 1 and fd 2    |
| `{"mode": "long_line", "bytes": n}`  | write one line of n bytes to stdout, return n      |
| `{"mode": "unencodable"}`            | return an object JSON cannot hold                  |
| `{"mode": "fork"}`                   | fork a grandchild that sleeps for ever; its pid    |
| `{"mode": "fork_setsid"}`            | fork a grandchild that leaves the worker's session |
|                                      | (setsid) and forks a child of its own into another |
|                                      | process group; both sleep for ever; `[pid, pid]`   |
| `{"mode": "memory", "mb": n}`        | allocate and keep n MiB, return the pid            |
| `{"mode": "big", "bytes": n}`        | return a string of n bytes                         |
| `{"mode": "nested", "depth": n}`     | return a list nested n deep                        |
| `{"mode": "wait_for", "path": p}`    | wait until file p exists, then return the pid      |
| ... with `"bytes": n`                | ... then a string of n bytes instead of the pid    |
| `{"mode": "limit_memory", "mb": n}`  | cap RLIMIT_AS n MiB above use (0: lift), then `"then"` |
| `{"mode": "channel", "data": s}`     | write s (latin-1, `"repeat"` times) to the answers pipe |
| `{"mode": "raise_unprintable"}`      | raise an exception whose `str()` raises            |
| `{"mode": "raise_surrogate"}`        | raise with a message UTF-8 cannot encode           |

Any action may carry `"record": path`: its `"id"` is appended to that file before anything
else happens, so a test can count how many times each action really ran; and `"sleep": s`:
the handler sleeps s seconds (after recording) before doing what its mode says. "hang", "spin" and
"ignore_term" print `started <mode>` to stdout first, so a test can wait for that line.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import Any

_hoard: list[bytearray] = []


def handle(action: dict[str, Any]) -> Any:
    mode = action.get("mode", "ok")
    if "record" in action:
        with open(action["record"], "a") as f:
            f.write(f"{action.get('id')}\n")
    if "sleep" in action:
        time.sleep(float(action["sleep"]))
    if mode in ("hang", "spin", "ignore_term"):
        print(f"started {mode}", flush=True)
    if mode == "ok":
        return action
    if mode == "pid":
        return os.getpid()
    if mode == "exit":
        os._exit(int(action.get("code", 1)))
    if mode == "sys_exit":
        sys.exit(int(action.get("code", 1)))
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "sigsegv":
        ctypes.string_at(0)
    if mode == "raise":
        raise ValueError(action.get("message", "boom"))
    if mode == "hang":
        while True:
            time.sleep(3600)
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    if mode == "spin":
        while True:
            pass
    if mode == "flood":
        lines = int(action.get("lines", 100_000))
        for i in range(lines):
            print(f"flood line {i} " + "x" * 60)
        return lines
    if mode == "flood_until":
        lines = 0
        while not os.path.exists(action["path"]):
            for _ in range(1000):
                print(f"flood line {lines} " + "x" * 60)
                lines += 1
        return lines
    if mode == "flood_raw":
        chunk = b"\xff\xfe invalid \xc3\x28 utf-8 \x80\n" * 64
        left = int(action.get("bytes", 1 << 20))
        while left > 0:
            os.write(1, chunk)
            os.write(2, chunk)
            left -= 2 * len(chunk)
        return "flooded"
    if mode == "long_line":
        os.write(1, b"y" * int(action["bytes"]) + b"\n")
        return action["bytes"]
    if mode == "unencodable":
        return object()
    if mode == "fork":
        child = os.fork()
        if child == 0:
            while True:
                time.sleep(3600)
        return child
    if mode == "fork_setsid":
        return _fork_setsid()
    if mode == "memory":
        _hoard.append(bytearray(int(action.get("mb", 100)) << 20))
        return os.getpid()
    if mode == "big":
        return "x" * int(action.get("bytes", 1 << 20))
    if mode == "nested":
        value: list[Any] = []
        for _ in range(int(action.get("depth", 1000)) - 1):
            value = [value]
        return value
    if mode == "wait_for":
        while not os.path.exists(action["path"]):
            time.sleep(0.005)
        return "x" * int(action["bytes"]) if "bytes" in action else os.getpid()
    if mode == "limit_memory":
        _limit_memory(int(action.get("mb", 0)))
        return handle({**action, "mode": action.get("then", "pid")})
    if mode == "channel":  # forge frames on the worker's own channel to the master
        data = str(action["data"]).encode("latin-1") * int(action.get("repeat", 1))
        view = memoryview(data)
        while view:
            view = view[os.write(4, view) :]
        return "written"
    if mode == "raise_unprintable":
        raise _Unprintable
    if mode == "raise_surrogate":
        raise ValueError("lone \ud800 surrogate")
    raise ValueError(f"unknown mode {mode!r}")


def _limit_memory(mb: int) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if not mb:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        return
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) << 10
    resource.setrlimit(resource.RLIMIT_AS, (size + (mb << 20), hard))


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def _fork_setsid() -> list[int]:
    """An escapee: out of the worker's process group (killpg misses it), with a child that
    is out of the escapee's own group too (killing the escapee's group misses that one)."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                os.setpgid(0, 0)
                # Written once it is out of the escapee's group, so the worker returns then.
                os.write(w, f"{os.getpid()}\n".encode())
                os.close(w)
                while True:
                    time.sleep(3600)
            os.close(w)
            while True:
                time.sleep(3600)
        finally:
            os._exit(1)
    os.close(w)
    with os.fdopen(r) as pipe:
        return [child, int(pipe.readline())]
