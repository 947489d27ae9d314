"""Bounds on what a handler can make the master hold, each pushed past: an exception's text
and a line of its output. (The socket's bounds are pushed past in test_attacks.py.)"""

from __future__ import annotations

import pytest
import trio
from structlog.testing import capture_logs

from qoper8d import open_pool
from qoper8d._output import MAX_LINE
from qoper8d._report import MAX_TEXT
from qoper8d.errors import HandlerError

pytestmark = pytest.mark.timeout(60)


async def test_an_exception_s_text_is_cut_to_its_bound_keeping_both_ends() -> None:
    message = "head " + "m" * (4 * MAX_TEXT) + " tail"
    with trio.fail_after(20):
        async with open_pool("handlers.crash:handle", size=1) as pool:
            with pytest.raises(HandlerError) as caught:
                await pool.run({"mode": "raise", "message": message})
            # The worker carries on.
            assert await pool.run({"mode": "ok"}) == {"mode": "ok"}
    err = caught.value
    assert len(err.message) < MAX_TEXT + 100
    assert err.message.startswith("head mmm")
    assert err.message.endswith("mmm tail")
    assert f"[... {len(message) - MAX_TEXT} characters ...]" in err.message
    assert len(err.traceback) < MAX_TEXT + 100


async def test_a_line_of_output_longer_than_its_bound_is_cut() -> None:
    size = 20 * MAX_LINE
    with trio.fail_after(20), capture_logs() as logs:
        async with open_pool("handlers.crash:handle", size=1) as pool:
            assert await pool.run({"mode": "long_line", "bytes": size}) == size
            # The master reads output beside the answers, so it may log it after the answer.
            while not any(e["event"] == "worker.output" for e in logs):  # noqa: ASYNC110
                await trio.sleep(0.005)  # (a log has no event to wait on)
            await pool.stop()
    lines = [e["line"] for e in logs if e["event"] == "worker.output"]
    assert lines
    for line in lines:
        kept, _, _ = line.partition(" [... ")
        assert len(kept) <= MAX_LINE
        assert set(kept) == {"y"}
    # The first piece says how much of what the worker wrote at once it left out.
    assert lines[0].startswith("y" * MAX_LINE + " [... ")
    assert lines[0].endswith(" more bytes]")
