"""The queue of accepted actions waiting for a worker, and the rule that sizes a batch.

Pure: no trio, no clock, no processes. The engine owns one `JobQueue` and asks it for
batches; the queue never decides when to dispatch, only what goes out.

The queue is a list read from `head`, so a batch is one slice, not a pop per job, and each
job's payload has a *mark*, its offset in the stream of queued bytes: cutting a batch to
`max_batch_bytes` is one bisect, not a length per job. Two things take the queue off that
fast path, each handled by a slower walk that skips what must not go out:

- *tombstones*: jobs cancelled while queued stay in the list (removing one from the middle
  would shift every mark) until the walk passes them. Their payload is dropped at once, so
  a cancelled job costs a few dozen bytes, and the list is compacted when tombstones
  outnumber the live jobs: memory held by cancelled work is released, not kept until
  dispatch happens to reach it;
- *replays*: jobs put back at the head after their worker died (`requeue`); they may be out
  of order and their marks mean nothing;
- *holds* are not a walk but a rebuild: a sink may be held (a client not reading its
  answers), and its jobs are then taken out of the list and set aside, as are any that
  arrive for it, so that other sinks' jobs are dispatched past them; they come back at the
  head, as replays, when the sink is released.

`live` counts every job waiting, held ones included; `bytes` is their payload bytes.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from operator import attrgetter

from qoper8d._jobs import Job

__all__ = ["BATCH_RESULT_BYTES", "BATCH_SECONDS", "JobQueue", "batch_length"]

_payload_of = attrgetter("payload")
#: Taken jobs before the head that make it worth cutting the list's front off.
_COMPACT = 4096
#: Tombstones that, once they also outnumber the live jobs, make it worth rebuilding.
_COMPACT_TOMBSTONES = 1024
#: About how much work (seconds of actions) one batch should hold at most.
BATCH_SECONDS = 0.25
#: About how many bytes of results one batch should bring back at most (see `batch_length`).
BATCH_RESULT_BYTES = 1 << 20


def batch_length(
    queued: int, size: int, most: int, action_seconds: float, result_bytes: float
) -> int:
    """How many of `queued` jobs the next free worker of a pool of `size` takes (>= 1).

    Its share of the queue: one action while the queue is shallow, more as it deepens, at
    most `most`. Slow actions (`action_seconds`, smoothed) gain nothing from batching and
    would wait behind each other, so a batch holds about `BATCH_SECONDS` of work; actions
    with large results (`result_bytes`, smoothed) come back about `BATCH_RESULT_BYTES` at a
    time, so that a client slow to read them never has a pool's worth piled up in the
    master. `max_batch_bytes` cuts the batch further, in `JobQueue.take`.
    """
    want = min(-(-queued // size), most)
    if action_seconds > 0 and action_seconds * want > BATCH_SECONDS:
        want = int(BATCH_SECONDS / action_seconds)
    if result_bytes > 0 and result_bytes * want > BATCH_RESULT_BYTES:
        want = int(BATCH_RESULT_BYTES / result_bytes)
    return max(1, want)


class JobQueue:
    """Accepted jobs waiting for a worker, oldest first (see the module docstring)."""

    __slots__ = ("_head", "_held", "_jobs", "_marks", "_replay_end", "bytes", "live", "tombstones")

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._head = 0
        #: `_marks[i]` is where `_jobs[i]`'s payload starts in the stream of queued bytes;
        #: one more mark than jobs, the last where the last payload ends.
        self._marks = [0]
        #: Jobs before this index were put back (`requeue`).
        self._replay_end = 0
        #: Held sinks and the jobs set aside for them, in order.
        self._held: dict[object, list[Job]] = {}
        #: Jobs waiting, held ones included.
        self.live = 0
        #: Cancelled jobs still in the list.
        self.tombstones = 0
        #: Payload bytes of the jobs waiting.
        self.bytes = 0

    def __len__(self) -> int:
        return self.live

    # -- in --------------------------------------------------------------------------------

    def push(self, job: Job) -> None:
        """Queue `job` at the tail."""
        size = len(job.payload)
        if self._held:
            aside = self._held.get(job.sink)
            if aside is not None:
                aside.append(job)
                self.live += 1
                self.bytes += size
                return
        self._jobs.append(job)
        marks = self._marks
        marks.append(marks[-1] + size)
        self.live += 1
        self.bytes += size

    def extend(self, jobs: list[Job], payloads: list[bytes]) -> None:
        """Queue `jobs` (whose payloads are `payloads`) at the tail, in order."""
        if self._held:
            for job in jobs:
                self.push(job)
            return
        self._jobs.extend(jobs)
        marks = self._marks
        last = marks.pop()
        marks.extend(accumulate(map(len, payloads), initial=last))
        self.live += len(jobs)
        self.bytes += marks[-1] - last

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs back at the head, in order (they never started)."""
        if self._held:
            held = self._held
            for job in reversed([job for job in jobs if job.sink in held]):
                held[job.sink].insert(0, job)
                self.live += 1
                self.bytes += len(job.payload)
            jobs = [job for job in jobs if job.sink not in held]
            if not jobs:
                return
        head = self._head
        replayed = max(0, self._replay_end - head) + len(jobs)
        if head >= len(jobs):
            self._head = head - len(jobs)
            self._jobs[self._head : head] = jobs
        else:
            # The list grows at its front: shift the marks along (those of the jobs put
            # back are never read: replayed jobs are walked, not bisected).
            self._marks[:head] = [self._marks[head]] * len(jobs)
            self._jobs[:head] = jobs
            self._head = 0
        self._replay_end = self._head + replayed
        self.live += len(jobs)
        self.bytes += sum(map(len, map(_payload_of, jobs)))

    # -- out -------------------------------------------------------------------------------

    def take(self, want: int, max_bytes: int) -> tuple[list[Job], list[bytes], bool]:
        """The next batch: at most `want` jobs whose payloads fit in `max_bytes` (at least
        one job, however long), their payloads, and whether it holds replayed jobs. Empty
        only when every job waiting belongs to a held sink."""
        head = self._head
        if self.tombstones or head < self._replay_end:
            return self._take_walking(want, max_bytes)
        marks = self._marks
        last = len(marks)
        if head + 1 >= last:
            return [], [], False  # what waits, if anything, is held
        # The longest run from the head, of at most `want` jobs, that fits in max_bytes.
        end = bisect_right(marks, marks[head] + max_bytes, head + 2, min(head + want + 1, last)) - 1
        batch = self._jobs[head:end]
        self.live -= len(batch)
        self.bytes -= marks[end] - marks[head]
        self._advance(end)
        payloads = list(map(_payload_of, batch))
        return batch, payloads, False

    def _take_walking(self, want: int, max_bytes: int) -> tuple[list[Job], list[bytes], bool]:
        jobs = self._jobs
        head = self._head
        replayed = head < self._replay_end
        batch: list[Job] = []
        payloads: list[bytes] = []
        total = 0
        while len(batch) < want and head < len(jobs):
            job = jobs[head]
            if job.cancelled:
                self.tombstones -= 1
                head += 1
                continue
            size = len(job.payload)
            if batch and total + size > max_bytes:
                break
            batch.append(job)
            payloads.append(job.payload)
            total += size
            head += 1
        while head < len(jobs) and jobs[head].cancelled:  # so that no tombstone outlives the list
            self.tombstones -= 1
            head += 1
        self.live -= len(batch)
        self.bytes -= total
        self._advance(head)
        return batch, payloads, replayed

    def _advance(self, head: int) -> None:
        jobs = self._jobs
        if head >= len(jobs):
            jobs.clear()
            self._marks = [0]
            self._head = self.tombstones = self._replay_end = 0
        elif head > _COMPACT and head * 2 > len(jobs):
            del jobs[:head]
            del self._marks[:head]
            self._head = 0
            self._replay_end = max(0, self._replay_end - head)
        else:
            self._head = head

    # -- taking jobs back ------------------------------------------------------------------

    def cancel(self, job: Job) -> None:
        """Take a waiting `job` out (the caller knows it is waiting, not running)."""
        job.cancelled = True
        self.live -= 1
        self.bytes -= len(job.payload)
        job.payload = b""  # a tombstone keeps no payload alive
        aside = self._held.get(job.sink)
        if aside is not None and any(j is job for j in aside):
            aside.remove(job)
        else:
            self.tombstones += 1
        self._settle()

    def withdraw(self, sink: object) -> list[Job]:
        """Take every waiting job of `sink` out (it is gone: a hold on it ends too); they
        are returned, in order."""
        out = [job for job in self._jobs[self._head :] if job.sink is sink and not job.cancelled]
        for job in out:
            job.cancelled = True
            self.bytes -= len(job.payload)
            job.payload = b""
        self.tombstones += len(out)
        aside = self._held.get(sink)
        if aside:
            for job in aside:
                job.cancelled = True
                self.bytes -= len(job.payload)
                job.payload = b""
            out = aside + out
        self._held.pop(sink, None)  # it is gone: nothing of it will come to hold
        self.live -= len(out)
        self._settle()
        return out

    def clear(self) -> list[Job]:
        """Empty the queue; the jobs that were waiting, in order (held ones first)."""
        out = [job for aside in self._held.values() for job in aside]
        out += [job for job in self._jobs[self._head :] if not job.cancelled]
        self._held = {}
        self._jobs = []
        self._marks = [0]
        self._head = self.tombstones = self._replay_end = self.live = self.bytes = 0
        return out

    # -- holding a sink --------------------------------------------------------------------

    def hold(self, sink: object) -> None:
        """Set `sink`'s jobs aside, now and as they come, until `release(sink)`."""
        if sink in self._held:
            return
        rest = self._jobs[self._head :]
        aside = [job for job in rest if job.sink is sink and not job.cancelled]
        self._held[sink] = aside
        if aside:
            for job in aside:
                job.cancelled = True  # a tombstone in the list, for the rebuild to drop
            self._rebuild()
            for job in aside:
                job.cancelled = False

    def release(self, sink: object) -> None:
        """Stop holding `sink`; the jobs set aside go back at the head, as jobs put back do
        (they were accepted before anything queued since, and may be out of order: some
        were set aside when their worker died)."""
        aside = self._held.pop(sink, None)
        if not aside:
            return
        self.live -= len(aside)
        self.bytes -= sum(map(len, map(_payload_of, aside)))
        self.requeue(aside)

    def held(self, sink: object) -> bool:
        return sink in self._held

    # -- looking ---------------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """The jobs waiting, in the order they would go out (held ones last)."""
        out = [job for job in self._jobs[self._head :] if not job.cancelled]
        out += [job for aside in self._held.values() for job in aside]
        return out

    def _settle(self) -> None:
        """Release what cancelled jobs hold: nothing left, or mostly tombstones, compacts."""
        if not self.live:
            held = self._held
            self.clear()
            self._held = {sink: [] for sink in held}  # still held, with nothing waiting
        elif self.tombstones > _COMPACT_TOMBSTONES and self.tombstones > self.live:
            self._rebuild()

    def _rebuild(self) -> None:
        head = self._head
        rest = self._jobs[head:]
        replayed = sum(1 for job in rest[: max(0, self._replay_end - head)] if not job.cancelled)
        jobs = [job for job in rest if not job.cancelled]
        self._jobs = jobs
        self._marks = list(accumulate(map(len, map(_payload_of, jobs)), initial=0))
        self._head = self.tombstones = 0
        self._replay_end = replayed

    def __repr__(self) -> str:
        return f"<JobQueue live={self.live} bytes={self.bytes} tombstones={self.tombstones}>"
