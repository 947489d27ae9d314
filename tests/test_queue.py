"""The engine's queue against a model: batches in order, within max_batch_bytes, as long as
the rules allow, through requeues, cancellations and compaction. No processes: the queue is
synchronous code, and a hypothesis state machine drives it much harder than a pool could."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qoper8d import _engine, wire
from qoper8d._engine import Engine
from qoper8d._handle import WorkerHandle
from qoper8d._jobs import Job
from qoper8d._map import MapIterator
from qoper8d.config import PoolConfig
from qoper8d.errors import ActionCancelled, ActionError

LIMIT = 64  # max_batch_bytes


class Collector:
    """A sink that records the error outcomes it is given."""

    def __init__(self) -> None:
        self.errors: list[tuple[Job, ActionError]] = []

    def result(self, job: Job, payload: msgspec.Raw, worker: Any) -> None:
        raise AssertionError("no job is answered here")

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Any) -> None:
        raise AssertionError("no job is answered here")

    def error(self, job: Job, err: ActionError, worker: Any) -> None:
        self.errors.append((job, err))


def new_engine(size: int) -> Engine:
    # The queue never touches the nursery: dispatch finds no idle worker.
    engine = Engine(PoolConfig(size=size, max_batch_bytes=LIMIT), cast(trio.Nursery, None))
    engine.accepting = True
    return engine


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = new_engine(size=2)
        self.sink = Collector()
        self.model: list[Job] = []  # the live queued jobs, in the order they must go out
        self.put_back: set[int] = set()  # ids of jobs requeued and not taken since
        self.in_flight: list[list[Job]] = []
        self.tags = 0

    def job(self, size: int) -> Job:
        self.tags += 1
        return Job(b"x" * size, self.sink, self.tags)

    @rule(size=st.integers(1, 80))
    def submit(self, size: int) -> None:
        job = self.job(size)
        self.engine.enqueue(job)
        self.model.append(job)

    @rule(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30))
    def submit_many(self, sizes: list[int]) -> None:
        jobs = [self.job(size) for size in sizes]
        self.engine.submit_many(jobs, [job.payload for job in jobs])
        self.model.extend(jobs)

    @precondition(lambda self: self.model)
    @rule(most=st.integers(1, 50))
    def take(self, most: int) -> None:
        want = min(-(-len(self.model) // self.engine.size), most)
        batch, payloads, replayed = self.engine.take_batch(most)
        assert 1 <= len(batch) <= want
        assert batch == self.model[: len(batch)]
        assert payloads == [job.payload for job in batch]
        size = sum(map(len, payloads))
        assert size <= LIMIT or len(batch) == 1
        if len(batch) < want:  # cut short by the byte limit, and only by it
            assert size + len(self.model[len(batch)].payload) > LIMIT
        tags = [job.tag for job in batch]
        if any(id(job) in self.put_back for job in batch):
            assert replayed
        if not replayed:
            assert tags == sorted(tags)
        del self.model[: len(batch)]
        self.put_back -= {id(job) for job in batch}
        self.in_flight.append(batch)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        """A worker died: its batch from some position on goes back to the head."""
        batch = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        rest = batch[data.draw(st.integers(0, len(batch) - 1)) :]
        self.engine.requeue(rest)
        self.model[:0] = rest
        self.put_back |= {id(job) for job in rest}

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = self.model.pop(data.draw(st.integers(0, len(self.model) - 1)))
        self.engine.cancel(job)
        assert isinstance(self.sink.errors[-1][1], ActionCancelled)

    @invariant()
    def counts_agree(self) -> None:
        engine = self.engine
        assert engine.queued == len(self.model)
        assert engine.queued_jobs() == self.model
        assert len(engine.marks) == len(engine.queue) + 1


@pytest.fixture
def small_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compact after a few taken jobs, not thousands, so the machine reaches it.
    monkeypatch.setattr(_engine, "_COMPACT", 8)


def test_queue_against_its_model(small_compaction: None) -> None:
    QueueMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
    QueueMachine.TestCase().runTest()


async def test_map_keeps_order_through_a_batch_of_put_back_jobs() -> None:
    """Workers died in an order that put a map's jobs back as positions 0, 2, 1, 3: their
    results still come out as 0, 1, 2, 3."""
    engine = new_engine(size=1)
    got: list[Any] = []

    async def consume(it: MapIterator) -> None:
        got.extend([r async for r in it])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            it = MapIterator(engine, ({"x": i} for i in range(4)), 8, False)
            nursery.start_soon(consume, it)
            await trio.testing.wait_all_tasks_blocked()
            jobs = [engine.take_batch(1)[0][0] for _ in range(3)]  # three workers take one each
            for job in (jobs[1], jobs[2], jobs[0]):  # ...and die in this order
                engine.requeue([job])
            batch, _, replayed = engine.take_batch(10)
            assert [job.tag for job in batch] == [0, 2, 1, 3]
            assert replayed
            worker = SimpleNamespace(inflight=batch, pos=0, replayed=replayed, pid=1)
            answers = b"".join(wire.encode_done(b"%d" % (10 + job.tag)) for job in batch)
            joined = wire.join_done(answers)
            assert joined is not None
            engine._deliver_run(cast(WorkerHandle, worker), joined, len(batch))
    assert got == [10, 11, 12, 13]
