"""The queue against a model: batches in order, within max_batch_bytes, as long as the
rules allow, through requeues, cancellations, holds, withdrawals and compaction. The queue
is pure code (`qoper8d._jobqueue`), so a hypothesis state machine drives it directly and much
harder than a pool could."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qoper8d import _jobqueue
from qoper8d._engine import Engine
from qoper8d._jobqueue import BATCH_RESULT_BYTES, BATCH_SECONDS, JobQueue, batch_length
from qoper8d._jobs import Job
from qoper8d._map import MapIterator
from qoper8d.config import PoolConfig

LIMIT = 64  # max_batch_bytes


class Sink:
    """A sink that is never answered here: the queue only stores it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def result(self, job: Job, payload: msgspec.Raw, worker: Any) -> None:
        raise AssertionError("no job is answered here")

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Any) -> None:
        raise AssertionError("no job is answered here")

    def error(self, job: Job, err: Any, worker: Any) -> None:
        raise AssertionError("no job is answered here")

    def __repr__(self) -> str:
        return self.name


SINKS = [Sink("a"), Sink("b"), Sink("c")]


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queue = JobQueue()
        self.model: list[Job] = []  # the live jobs that may go out, in the order they must
        self.held: dict[Any, list[Job]] = {}  # held sinks and their jobs, in order
        self.put_back: set[int] = set()  # tags of jobs put back and not taken since
        self.in_flight: list[list[Job]] = []
        self.tags = 0

    def job(self, size: int, sink: Sink) -> Job:
        self.tags += 1
        return Job(b"x" * size, sink, self.tags)

    def waiting(self) -> list[Job]:
        return self.model + [job for jobs in self.held.values() for job in jobs]

    def arrive(self, jobs: list[Job]) -> None:
        """Jobs reach the tail: a held sink's are set aside (the model does it at once)."""
        for job in jobs:
            if job.sink in self.held:
                self.held[job.sink].append(job)
            else:
                self.model.append(job)

    @rule(size=st.integers(1, 80), sink=st.sampled_from(SINKS))
    def push(self, size: int, sink: Sink) -> None:
        job = self.job(size, sink)
        self.queue.push(job)
        self.arrive([job])

    @rule(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30), sink=st.sampled_from(SINKS))
    def extend(self, sizes: list[int], sink: Sink) -> None:
        jobs = [self.job(size, sink) for size in sizes]
        self.queue.extend(jobs, [job.payload for job in jobs])
        self.arrive(jobs)

    @precondition(lambda self: self.model)
    @rule(most=st.integers(1, 50))
    def take(self, most: int) -> None:
        want = min(len(self.model), most)
        batch, payloads, replayed = self.queue.take(want, LIMIT)
        assert 1 <= len(batch) <= want
        assert batch == self.model[: len(batch)]
        assert payloads == [job.payload for job in batch]
        size = sum(map(len, payloads))
        assert size <= LIMIT or len(batch) == 1
        if len(batch) < want:  # cut short by the byte limit, and only by it
            assert size + len(self.model[len(batch)].payload) > LIMIT
        tags = [job.tag for job in batch]
        if any(job.tag in self.put_back for job in batch):
            assert replayed
        if not replayed:
            assert tags == sorted(tags)
        del self.model[: len(batch)]
        self.put_back -= {job.tag for job in batch}
        self.in_flight.append(batch)

    @precondition(lambda self: not self.model)
    @rule()
    def take_when_only_held_jobs_wait(self) -> None:
        batch, payloads, _ = self.queue.take(10, LIMIT)
        assert batch == []
        assert payloads == []

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        """A worker died: its batch from some position on goes back to the head."""
        batch = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        rest = batch[data.draw(st.integers(0, len(batch) - 1)) :]
        self.queue.requeue(rest)
        # Put back at the head; the held sinks' among them are set aside when reached.
        self.model[:0] = [job for job in rest if job.sink not in self.held]
        for job in reversed(rest):
            if job.sink in self.held:
                self.held[job.sink].insert(0, job)
        self.put_back |= {job.tag for job in rest}

    @precondition(lambda self: self.waiting())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.waiting()))
        self.queue.cancel(job)
        assert job.cancelled
        assert job.payload == b"", "a tombstone keeps no payload"
        if job in self.model:
            self.model.remove(job)
        else:
            self.held[job.sink].remove(job)

    @rule(sink=st.sampled_from(SINKS))
    def withdraw(self, sink: Sink) -> None:
        gone = self.queue.withdraw(sink)
        expected = self.held.get(sink, []) + [job for job in self.model if job.sink is sink]
        assert sorted(job.tag for job in gone) == sorted(job.tag for job in expected)
        self.model = [job for job in self.model if job.sink is not sink]
        self.held.pop(sink, None)

    @rule(sink=st.sampled_from(SINKS))
    def hold(self, sink: Sink) -> None:
        self.queue.hold(sink)
        if sink not in self.held:
            self.held[sink] = [job for job in self.model if job.sink is sink]
            self.model = [job for job in self.model if job.sink is not sink]

    @rule(sink=st.sampled_from(SINKS))
    def release(self, sink: Sink) -> None:
        self.queue.release(sink)
        back = self.held.pop(sink, [])
        self.put_back |= {job.tag for job in back}
        self.model[:0] = back

    @invariant()
    def counts_agree(self) -> None:
        queue = self.queue
        waiting = self.waiting()
        assert queue.live == len(waiting)
        assert queue.bytes == sum(len(job.payload) for job in waiting)
        assert sorted(job.tag for job in queue.jobs()) == sorted(job.tag for job in waiting)
        assert len(queue._marks) == len(queue._jobs) + 1
        if not waiting:
            assert queue._jobs == [], "an empty queue holds no tombstones"


@pytest.fixture
def small_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    # Compact after a few taken jobs and tombstones, not thousands, so the machine gets there.
    monkeypatch.setattr(_jobqueue, "_COMPACT", 8)
    monkeypatch.setattr(_jobqueue, "_COMPACT_TOMBSTONES", 4)


def test_queue_against_its_model(small_compaction: None) -> None:
    QueueMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
    QueueMachine.TestCase().runTest()


def test_cancelled_jobs_release_their_memory() -> None:
    """Defect 7: a queue whose live jobs were all cancelled holds nothing; one mostly of
    tombstones is rebuilt, not left for dispatch to reach."""
    queue = JobQueue()
    sink = Sink("a")
    jobs = [Job(b"x" * 1000, sink, i) for i in range(5000)]
    queue.extend(jobs, [job.payload for job in jobs])
    for job in jobs[:-1]:
        queue.cancel(job)
    assert queue.live == 1
    assert queue.bytes == 1000
    assert len(queue._jobs) < 2 * _jobqueue._COMPACT_TOMBSTONES, "rebuilt, tombstones gone"
    queue.cancel(jobs[-1])
    assert queue._jobs == []
    assert queue.bytes == 0
    more = [Job(b"y", sink, i) for i in range(10)]
    queue.extend(more, [job.payload for job in more])
    assert queue.withdraw(sink) == more
    assert queue._jobs == []
    assert queue.live == 0


@pytest.mark.parametrize(
    ("queued", "size", "most", "seconds", "result", "want"),
    [
        (1, 4, 100, 0.0, 0.0, 1),  # shallow: one each
        (40, 4, 100, 0.0, 0.0, 10),  # deep: a share each
        (40, 4, 3, 0.0, 0.0, 3),  # capped by the worker's allowance
        (1000, 1, 1000, BATCH_SECONDS / 10, 0.0, 10),  # slow actions: a quarter second
        (1000, 1, 1000, 2 * BATCH_SECONDS, 0.0, 1),  # slower: one at a time
        (1000, 1, 1000, 0.0, BATCH_RESULT_BYTES / 4, 4),  # large results: a MiB at a time
        (1000, 1, 1000, 0.0, 5 * BATCH_RESULT_BYTES, 1),  # larger: one at a time
    ],
)
def test_batch_length(
    queued: int, size: int, most: int, seconds: float, result: float, want: int
) -> None:
    assert batch_length(queued, size, most, seconds, result) == want


async def test_map_keeps_order_through_a_batch_of_put_back_jobs() -> None:
    """Workers died in an order that put a map's jobs back as positions 0, 2, 1, 3: their
    results, delivered as one run by a worker whose batch was a replay, still come out as
    0, 1, 2, 3."""
    got: list[Any] = []

    async def consume(it: MapIterator) -> None:
        got.extend([r async for r in it])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # An engine with no worker: dispatch finds none idle, so the queue is ours.
            engine = Engine(PoolConfig(size=1, max_batch_bytes=LIMIT), nursery)
            engine.open_intake()
            it = MapIterator(engine, ({"x": i} for i in range(4)), 8, False)
            nursery.start_soon(consume, it)
            await trio.testing.wait_all_tasks_blocked()
            jobs = [engine.take_batch(1)[0][0] for _ in range(3)]  # three workers take one each
            for job in (jobs[1], jobs[2], jobs[0]):  # ...and die in this order
                engine.queue.requeue([job])
            batch, _, replayed = engine.take_batch(10)
            assert [job.tag for job in batch] == [0, 2, 1, 3]
            assert replayed
            # The sink's bulk path, as the engine calls it for a run of answers.
            answerer = SimpleNamespace(pid=1, replayed=replayed)
            it.decoded(batch, [10 + job.tag for job in batch], answerer)
    assert got == [10, 11, 12, 13]
