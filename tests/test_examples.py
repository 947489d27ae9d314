"""The two examples, run as real programs: `examples/web_front.py` and `examples/loop_5000.py`.

Each test starts an example with `sys.executable` from the project root, under a deadline,
and synchronises only on what the program prints: the web front's `listening on URL` line on
stdout, and the `sleeping` line a worker prints, which reaches the master's log on stderr.
HTTP requests are real ones (urllib, in a thread). Leaving `open_web_front` sends SIGTERM and
requires exit code 0, so every web test also checks the graceful stop; the autouse
`no_orphans` fixture then proves that neither the program nor any of its workers outlived it.
"""

from __future__ import annotations

import html
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import descendants

ROOT = Path(__file__).resolve().parent.parent
WEB_FRONT = ROOT / "examples" / "web_front.py"
LOOP = ROOT / "examples" / "loop_5000.py"

pytest.importorskip("hypercorn", reason="the examples need the `examples` dependency group")


class Lines:
    """What a child writes to one pipe, split into lines as it arrives, with waits on it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        partial_line = b""
        async for chunk in stream:
            partial_line += chunk
            *complete, partial_line = partial_line.split(b"\n")
            self.lines.extend(line.decode("utf-8", "replace") for line in complete)
            self._notify()
        if partial_line:
            self.lines.append(partial_line.decode("utf-8", "replace"))
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line matching `pattern`, waiting for it; fails if the pipe closes first."""
        seen = 0
        while True:
            changed = self._changed
            for line in self.lines[seen:]:
                match = re.search(pattern, line)
                if match:
                    return match
            seen = len(self.lines)
            if self.closed:
                raise AssertionError(f"no line matched {pattern!r}; got:\n{self.text()}")
            await changed.wait()

    async def wait_closed(self) -> None:
        while not self.closed:
            await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class WebFront:
    """A running `examples/web_front.py`."""

    process: trio.Process
    url: str
    stdout: Lines
    stderr: Lines
    #: Leaving `open_web_front` checks for a graceful stop unless a test did it itself.
    stopped: bool = field(default=False)

    async def stop(self) -> int:
        """SIGTERM, then the exit code once stdout is closed; fails after 10 s."""
        self.stopped = True
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await self.process.wait()
            await self.stdout.wait_closed()
        return code


@asynccontextmanager
async def open_web_front(size: int = 2) -> AsyncIterator[WebFront]:
    """Start the web front on a free port; yield once it says it is listening."""
    command = [sys.executable, str(WEB_FRONT), "--port", "0", "--size", str(size)]
    stdout, stderr = Lines(), Lines()
    async with trio.open_nursery() as nursery:
        # Cancelling run_process (a failed test, a deadline) kills the program; its workers
        # notice the master is gone and exit on their own (SPEC section 7).
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        assert process.stdout is not None
        assert process.stderr is not None
        nursery.start_soon(stdout.pump, process.stdout)
        nursery.start_soon(stderr.pump, process.stderr)
        try:
            match = await stdout.wait_for(r"^listening on (http://127\.0\.0\.1:\d+)$")
        except AssertionError:
            raise AssertionError(f"the web front did not start; stderr:\n{stderr.text()}") from None
        front = WebFront(process, match[1], stdout, stderr)
        yield front
        if not front.stopped:
            code = await front.stop()
            assert code == 0, stderr.text()
            assert stdout.lines[-1].startswith("stopped; actions:"), stdout.text()


async def fetch(url: str) -> tuple[int, str]:
    """GET `url` with urllib in a thread: the status and the body, errors included."""

    def get() -> tuple[int, str]:
        try:
            # The URL is our own server's, from its own "listening" line.
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    return await trio.to_thread.run_sync(get, abandon_on_cancel=True)


def pre(page: str, name: str) -> Any:
    """The JSON shown in `<pre class="name">`, unescaped and decoded."""
    match = re.search(rf'<pre class="{name}">(.*?)</pre>', page, re.DOTALL)
    assert match, page
    return json.loads(html.unescape(match[1]))


def page_pid(page: str) -> int:
    match = re.search(r'<span class="pid">(\d+)</span>', page)
    assert match, page
    return int(match[1])


async def test_web_front_page_shows_escaped_result_and_worker_pid() -> None:
    with trio.fail_after(30):
        async with open_web_front() as front:
            status, page = await fetch(
                f"{front.url}/test/?a=1&b=%3Ci%3Eb%3C%2Fi%3E&b=2&%3Cscript%3E=alert(1)"
            )
            assert status == 200, page
            # Every piece of the query is on the page, and none of it as live markup.
            assert "<script>" not in page
            assert "<i>" not in page
            assert "&lt;SCRIPT&gt;" in page
            assert "&lt;i&gt;b&lt;/i&gt;" in page
            assert pre(page, "action") == {"a": "1", "b": ["<i>b</i>", "2"], "<script>": "alert(1)"}
            result = pre(page, "result")
            # Only the action reached the worker: the request's master-side reply did not.
            assert result["upper"] == {"A": "1", "B": ["<i>b</i>", "2"], "<SCRIPT>": "alert(1)"}
            # The pid the master reports is the process that ran the handler, a worker of
            # this web front.
            assert page_pid(page) == result["pid"]
            assert result["pid"] in descendants(front.process.pid)


async def test_web_front_other_paths_are_404() -> None:
    with trio.fail_after(30):
        async with open_web_front(size=1) as front:
            for path in ("/", "/test/x", "/tests/?a=1", "/favicon.ico"):
                status, page = await fetch(front.url + path)
                assert status == 404, (path, page)
                assert "<h1>404</h1>" in page


async def test_web_front_failed_handler_gives_500_page_naming_the_code() -> None:
    with trio.fail_after(30):
        async with open_web_front(size=1) as front:
            status, page = await fetch(f"{front.url}/test/?fail=%3Cb%3Eboom%3C/b%3E")
            assert status == 500, page
            assert '<span class="code">handler_error</span>' in page
            assert "ValueError: &lt;b&gt;boom&lt;/b&gt;" in page
            assert "<b>" not in page
            assert "Traceback" not in page  # tracebacks stay in the server
            # The worker survived the failure and answers the next request.
            status, page = await fetch(f"{front.url}/test/?a=1")
            assert status == 200, page


async def test_web_front_answers_concurrent_requests_each_with_its_own_result() -> None:
    results: dict[int, tuple[int, str]] = {}

    async def one(url: str, n: int) -> None:
        results[n] = await fetch(f"{url}/test/?n={n}")

    with trio.fail_after(30):
        async with open_web_front(size=3) as front:
            async with trio.open_nursery() as nursery:
                for n in range(24):
                    nursery.start_soon(one, front.url, n)
            workers = descendants(front.process.pid)
    for n, (status, page) in results.items():
        assert status == 200, page
        assert pre(page, "result")["upper"] == {"N": str(n)}
        assert page_pid(page) in workers
    assert len(results) == 24


async def test_web_front_slow_action_holds_one_worker_and_sigterm_lets_it_finish() -> None:
    slow: list[tuple[int, str]] = []

    async def slow_request(url: str) -> None:
        slow.append(await fetch(f"{url}/test/?sleep=2"))

    with trio.fail_after(30):
        async with open_web_front(size=2) as front, trio.open_nursery() as nursery:
            nursery.start_soon(slow_request, front.url)
            # The worker's own line, logged by the master: the slow action is running now.
            await front.stderr.wait_for(r"sleeping 2\.0 s")
            # The master is not blocked: another request is answered meanwhile.
            status, page = await fetch(f"{front.url}/test/?quick=1")
            assert status == 200, page
            assert not slow, "the quick request waited for the slow one"
            # A graceful stop lets the request in progress finish, then exits 0.
            assert await front.stop() == 0, front.stderr.text()
            assert slow, "the web front exited before answering the slow request"
            status, page = slow[0]
            assert status == 200, page
            assert pre(page, "result")["upper"] == {"SLEEP": "2"}
            assert front.stdout.lines[-1] == "stopped; actions: 2 result"


async def test_loop_5000_prints_its_timing_and_exits_0() -> None:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, str(LOOP), "--count", "5000", "--size", "4"],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err
    lines = out.splitlines()
    assert re.fullmatch(r"5000 actions in \d+\.\d{3} s \(\d+/s\) with 4 workers", lines[0]), out
    pids = re.fullmatch(r"answered by (\d+) distinct worker pids: ([\d, ]+)", lines[1])
    assert pids, out
    assert 1 <= int(pids[1]) <= 4
    assert len(pids[2].split(", ")) == int(pids[1])


async def test_loop_5000_exits_1_when_results_are_wrong() -> None:
    # `handlers.echo:handle` gives the action back instead of x + 1: every check must fail.
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, str(LOOP), "--count", "50", "--handler", "handlers.echo:handle"],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    # Answers come back in the order workers finish, not the order they were queued.
    problems = re.findall(r"^problem: action (\d+): expected (\d+), got \{'x': (\d+)\}$", err, re.M)
    assert len(problems) == 10, err
    assert all(int(want) == int(x) + 1 and x == got for x, want, got in problems), err
    assert "... and 40 more problems" in err
