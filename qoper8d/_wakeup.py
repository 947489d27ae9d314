"""One task parked until plain synchronous code wakes it: the wait of every hot path here.

The pool's sinks, readers and writers are woken by code that runs synchronously (a read
that delivered answers, a send that queued output), so they cannot await an event they
would have to create, set and replace per wake-up. A `Wakeup` is the one place where a task
parks itself with trio's low-level `wait_task_rescheduled` and is rescheduled by `wake()`:
cheaper than a `trio.Event` (no object per wait, no set of waiters), and written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

__all__ = ["Wakeup"]


class Wakeup:
    """At most one task waiting; `wake()` is safe to call whether or not one is."""

    __slots__ = ("_on_abort", "task")

    def __init__(self) -> None:
        #: The waiting task, while one waits.
        self.task: trio.lowlevel.Task | None = None
        self._on_abort: Callable[[], None] | None = None

    @property
    def waiting(self) -> bool:
        return self.task is not None

    async def wait(self, on_abort: Callable[[], None] | None = None) -> None:
        """Park this task until `wake()`. If the task is cancelled meanwhile, `on_abort`
        runs (synchronously, before the cancellation is raised here)."""
        self.task = trio.lowlevel.current_task()
        self._on_abort = on_abort
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def wake(self) -> bool:
        """Reschedule the waiting task, if any; whether there was one."""
        task = self.task
        if task is None:
            return False
        self.task = self._on_abort = None
        trio.lowlevel.reschedule(task)
        return True

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        on_abort, self._on_abort = self._on_abort, None
        self.task = None
        if on_abort is not None:
            on_abort()
        return trio.lowlevel.Abort.SUCCEEDED
