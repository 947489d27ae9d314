"""Q-Oper8's 5,000-action loop, in Python: queue them all, time the last answer.

    python examples/loop_5000.py [--count 5000] [--size 4]

Q-Oper8's README measured its overhead with a loop that queued 5,000 actions with
`addToQueue` and, in the response handler, counted answers and printed the elapsed time when
the last one arrived. This does the same with `pool.add_to_queue(request, on_response)`: each
request is `{"action": {"x": i}, "expect": i + 1}`, and only the action travels to a worker;
`expect` stays here for the callback to check the result against. The program waits for the
last answer on an event (no polling), then prints

    5000 actions in 0.123 s (40650/s) with 4 workers
    answered by 4 distinct worker pids

and exits 0 only if every action was answered exactly once with the right result. The time
runs from the first `add_to_queue` to the last callback; starting the workers is not in it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

import qoper8d

#: The project root: put on the workers' import path so `handlers.echo` is found from any cwd.
ROOT = Path(__file__).resolve().parent.parent
#: `{"x": i} -> i + 1`: trivial on purpose, so the time measured is the pool's own.
HANDLER = "handlers.echo:plus_one"


@dataclass
class Tally:
    """What the callbacks saw, and the event the main task waits on."""

    count: int
    all_answered: trio.Event = field(default_factory=trio.Event)
    answered: int = 0
    pids: Counter[int | None] = field(default_factory=Counter)
    #: One line per wrong result, error or repeated answer (the first few are printed).
    problems: list[str] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    finished_at: float = 0.0

    def on_response(self, request: dict[str, Any], result: Any, pid: int | None) -> None:
        """Q-Oper8's response handler: check the answer, count it, notice the last one.

        It runs in this process, so it can read `request["expect"]`, which the worker never
        saw. It must stay cheap: the pool runs callbacks one at a time.
        """
        x = request["action"]["x"]
        self.pids[pid] += 1
        if x in self.seen:
            self.problems.append(f"action {x} answered twice")
        self.seen.add(x)
        if isinstance(result, qoper8d.ActionError):
            self.problems.append(f"action {x} ended {result.code}: {result.message}")
        elif result != request["expect"]:
            self.problems.append(f"action {x}: expected {request['expect']!r}, got {result!r}")
        self.answered += 1
        if self.answered == self.count:
            self.finished_at = time.perf_counter()
            self.all_answered.set()


async def run_loop(count: int, size: int, handler: str, deadline: float) -> tuple[Tally, float]:
    """Queue `count` actions at once and wait for the last answer; the tally and seconds."""
    tally = Tally(count)
    # Q-Oper8's queue had no bound; ours does (`pool.max_queue`), so make room for them all.
    max_queue = max(count, qoper8d.PoolConfig().max_queue)
    async with qoper8d.open_pool(
        handler, size=size, max_queue=max_queue, handler_path=[str(ROOT)]
    ) as pool:
        started = time.perf_counter()
        for i in range(count):
            pool.add_to_queue({"action": {"x": i}, "expect": i + 1}, tally.on_response)
        # Every accepted action ends exactly once, so this returns; the deadline is only a
        # guard that turns a bug into a failed run instead of a hang.
        with trio.move_on_after(deadline):
            await tally.all_answered.wait()
    return tally, tally.finished_at - started


def report(tally: Tally, seconds: float, size: int) -> bool:
    """Print the timing and the pids; the problems to stderr. True if all went right."""
    ok = tally.all_answered.is_set() and not tally.problems
    if tally.all_answered.is_set():
        rate = tally.count / seconds if seconds > 0 else float("inf")
        print(f"{tally.count} actions in {seconds:.3f} s ({rate:.0f}/s) with {size} workers")
    else:
        print(f"only {tally.answered} of {tally.count} actions answered before the deadline")
    pids = sorted(pid for pid in tally.pids if pid is not None)
    print(f"answered by {len(pids)} distinct worker pids: {', '.join(map(str, pids))}")
    for line in tally.problems[:10]:
        print(f"problem: {line}", file=sys.stderr)
    if len(tally.problems) > 10:
        print(f"... and {len(tally.problems) - 10} more problems", file=sys.stderr)
    return ok


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
        return value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=positive, default=5000, help="actions (default 5000)")
    parser.add_argument("--size", type=positive, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--handler",
        default=HANDLER,
        help="a handler that must turn {'x': i} into i + 1 (default %(default)s)",
    )
    parser.add_argument(
        "--deadline", type=float, default=120.0, help="seconds to wait for the last answer"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # structlog prints to stdout unless told otherwise; stdout is for the figures.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        tally, seconds = trio.run(
            run_loop, options.count, options.size, options.handler, options.deadline
        )
    except qoper8d.Qoper8Error as exc:  # the handler did not import, a worker did not start
        print(f"loop_5000: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the pool has stopped its workers on the way out
        return 130
    return 0 if report(tally, seconds, options.size) else 1


if __name__ == "__main__":
    sys.exit(main())
