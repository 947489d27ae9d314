"""A cluster node: between the control socket and the pool, one durable queue in Redis.

With `[cluster] backend = "redis"` every submit on this node's socket becomes an entry of
the shared stream (`_submits`, the front side), and this node's workers take entries from
it like every other node's (docs/cluster.md has the formats and the guarantees). The pool
below knows nothing of it: the node accepts entries into the pool as a front end does, and
is their sink.

Tasks, each batching all that piled up since it last ran (one Redis call per wake-up, never
one per action):

- intake and canceller (`Submits`): this node's clients' submits and cancels; the intake's
  call also takes what this node has room for, so that its own submits run here at once
  when it has idle workers (and, when it has not, on whichever node takes them first);
- feeder: `XREADGROUP COUNT` = what this node can take (a worker each plus the prefetch,
  which follows the rate at which its actions end, up to `cluster.prefetch`; minus what it
  holds and what the intake's call in flight may take;
  while it is idle, minus a reserve of a worker each, up to the prefetch, left for its own
  clients' next submits), each entry onto the pool;
- replier: the progress reports of what this node runs (those whose submitter asked, the
  latest of each), then their outcomes, each acknowledged and pushed to its submitter's
  reply list in one atomic script (the first acknowledgement wins, so a submitter gets one
  reply per entry however many nodes ran it). An entry of this node's own clients is
  answered at once, in process, and only acknowledged;
- listener: this node's reply list (answers and progress for its clients) and control list
  (cancels of entries it holds);
- keeper: every `claim_idle / 3` seconds the heartbeat (`status` lists live nodes), the
  renewal of the claims on what this node holds (no delivery counted), the takeover of
  entries silent nodes held past `claim_idle`, and the removal of dead nodes' consumers.

Bounds: this node's submits waiting for an answer, 2 x `pool.max_queue` (then
`queue_full`); entries held, `pool.size + cluster.prefetch` plus 1,000 awaiting replies;
progress reports waiting, one per entry held.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any

import coredis.exceptions
import msgspec
import structlog
import trio
from coredis.tokens import PureToken

from qoper8d._jobs import Job, decode_json
from qoper8d._link import LOST, Link, Refused, redacted
from qoper8d._streams import DEAD_MAXLEN, REPLY_MAXLEN, call_length, entry_fields, pack
from qoper8d._submits import CHUNK, Submits
from qoper8d._wakeup import Wakeup
from qoper8d.config import ClusterConfig
from qoper8d.errors import (
    ActionError,
    BadRequest,
    BadResult,
    QueueFull,
    ShuttingDown,
    Unavailable,
)

if TYPE_CHECKING:
    from qoper8d.pool import Pool

__all__ = ["Node", "node_name"]

log = structlog.get_logger("qoper8d.cluster")

#: Milliseconds a feeder's or listener's blocking read waits before it looks again.
_BLOCK_MS = 1000
#: Most elements of the reply and control lists taken per wake-up.
_TAKE = 1000
#: Seconds of work a node prefetches, at the rate it finishes actions: enough to hide its
#: reads (a read is sent with half of it still queued), little enough that long actions
#: are not queued behind each other on one node while another is idle.
_AHEAD = 0.02
#: Seconds over which that rate is measured.
_RATE_WINDOW = 0.05
_encode = msgspec.json.Encoder().encode
#: What is wrong with an entry written by hand that qoper8d cannot run: `bad_request`.
_UNRUNNABLE = (KeyError, ValueError, RecursionError, msgspec.DecodeError, ActionError, BadRequest)


def node_name(config: ClusterConfig) -> str:
    """This node's consumer name: `cluster.node`, or hostname-pid."""
    return config.node or f"{socket.gethostname()}-{os.getpid()}"


def _reply_size(item: tuple[_Held, bytes | None]) -> int:
    return len(item[1] or b"")


class _Held(msgspec.Struct, gc=False):
    """An entry this node took and runs, until its outcome is pushed."""

    entry: bytes
    reply_to: bytes
    ref: bytes
    #: Its submitter asked for progress reports.
    progress: bool = False
    job: Job | None = None
    #: Its claim was lost (another node took it, or it was cancelled): nothing to reply.
    lost: bool = False
    #: Its outcome is known (its reply may still wait for the replier).
    done: bool = False
    #: Its submitter is this node: answered in process, only acknowledged in Redis.
    mine: bool = False


class Node:
    """One node of the cluster (see the module docstring)."""

    def __init__(self, link: Link, pool: Pool, config: ClusterConfig) -> None:
        self.link = link
        self.pool = pool
        self.config = config
        self.keys = link.keys
        self.name = link.keys.node
        self.submits = Submits(
            link,
            config,
            secrets.token_hex(4),
            pool.config.max_queue,
            self._check_quiet,
            claim=self._claim,
            taken=self._taken,
        )
        self._mine = self.keys.reply.encode()
        #: Entries this node holds (in its pool or waiting for the replier), by id.
        self.held: dict[bytes, _Held] = {}
        self._room = Wakeup()
        #: Held entries whose outcome is not known yet: what room is counted against.
        self._running = 0
        #: The prefetch now: from a worker each (up to `cluster.prefetch`) to all of it, as
        #: fast as actions end here (`_AHEAD`); outcomes known so far, and when last looked.
        self.prefetch = self._least_prefetch()
        self._ended = 0
        self._rate_mark = (0.0, 0)
        #: Entries the feeder's read in flight, and the intake's call in flight, may take.
        self._reading = 0
        self._claimed = 0
        #: Outcomes for the replier: the reply to push (b"" for this node's own entries,
        #: only acknowledged), or None for an entry going back to the stream.
        self._replies: list[tuple[_Held, bytes | None]] = []
        #: The most replies one call carries now (see `_shorten`).
        self._reply_most = CHUNK
        #: Outcomes of this node's own entries, for its clients (ref, ok, result or error).
        self._answers: list[tuple[str, bool, bytes]] = []
        #: The latest progress report of each held entry whose submitter asked, by id.
        self._reports: dict[bytes, tuple[_Held, bytes]] = {}
        self._replier = Wakeup()
        self.taking = True
        self._quiet: trio.Event | None = None
        self._feeder = trio.CancelScope()
        #: What the last heartbeat learnt: live nodes, pending, waiting, dead.
        self.seen: dict[str, Any] = {"nodes": [], "pending": 0, "waiting": 0, "dead": 0}

    async def listen(self) -> None:
        """Answer this node's clients from its reply list; cancel what its control list
        names. One blocking call takes a whole batch (BLMPOP, Redis 7); on Redis 6.2, a
        BLPOP and then an LPOP for the rest."""
        keys = self.keys
        client = self.link.client
        watched = [keys.reply, keys.control]
        batched = True
        while True:
            await self.link.up()
            try:
                if batched:
                    got = await client.blmpop(
                        watched, _BLOCK_MS / 1000, PureToken.LEFT, count=_TAKE
                    )
                    if got is None:
                        continue
                    key, values = got[0], list(got[1])
                else:
                    first = await client.blpop(watched, timeout=_BLOCK_MS / 1000)
                    if first is None:
                        continue
                    key, value = first
                    values = [value, *(await client.lpop(key, _TAKE) or [])]
            except (
                coredis.exceptions.UnknownCommandError,
                coredis.exceptions.CommandNotSupportedError,
            ):
                batched = False
                continue
            except LOST as exc:
                self.link.lost(exc)
                continue
            except coredis.exceptions.RedisError as exc:
                await self.link.refused(exc, "BLMPOP" if batched else "BLPOP")
                continue
            if key == keys.control.encode():
                self._stop_held(values)
            else:
                self.submits.replied(values)

    def _stop_held(self, entries: list[bytes]) -> None:
        """Stop the jobs of entries this node no longer holds (cancelled, or taken over).
        One whose outcome is known already is left alone: it is not running, and its entry
        was answered by this node's own replier (which a renewal in flight can see)."""
        for entry in entries:
            held = self.held.get(entry)
            if held is not None and held.job is not None and not (held.done or held.lost):
                held.lost = True
                self.pool.cancel(held.job)

    # -- the worker side: entries this node takes ------------------------------------------

    def capacity(self) -> int:
        return self.pool.size + self.prefetch

    def _least_prefetch(self) -> int:
        return min(self.pool.size, self.config.prefetch)

    def _pace(self) -> None:
        """Set the prefetch from the rate at which actions ended here over the last
        `_RATE_WINDOW`: `_AHEAD` seconds of them, between a worker each and
        `cluster.prefetch`. Quick actions grow it to the cap in a few reads (what a node
        holds bounds its rate, so a higher rate follows each step up); slow ones keep it
        at the least, so they queue on no node while another has idle workers."""
        now = trio.current_time()
        since, ended = self._rate_mark
        if now - since < _RATE_WINDOW:
            return
        rate = (self._ended - ended) / (now - since)
        self._rate_mark = (now, self._ended)
        want = math.ceil(rate * _AHEAD)
        self.prefetch = max(self._least_prefetch(), min(self.config.prefetch, want))

    def room(self, *, reading: bool = True) -> int:
        """Entries this node may take now: one per worker plus the prefetch, minus those
        whose outcome is not known yet and those a call in flight may take (the feeder's
        blocked read left out with `reading` false); none while a full call's worth of
        replies waits."""
        if len(self._replies) >= CHUNK:
            return 0
        room = self.capacity() - self._running - self._claimed
        return room - self._reading if reading else room

    def _claim(self) -> int:
        """The intake's call takes what there is room for (the feeder's read in flight
        counted): its own submits among them, run here without another round trip."""
        self._claimed = max(0, self.room())
        return self._claimed

    def _taken(self, entries: list[Any]) -> None:
        self._claimed = 0
        self._take([(e[0], e[1]) for e in entries])
        self._room.wake()

    def _reserve(self) -> int:
        """What the feeder's read leaves to the intake while this node is idle: a worker
        each (up to the prefetch), so that its clients' next submits run here at once."""
        return 0 if self._running else self._least_prefetch()

    async def feed(self) -> None:
        """Take entries as this node has room for them, each onto the pool."""
        keys = self.keys
        client = self.link.client
        while self.taking:
            self._pace()
            room = self.room()
            reserve = self._reserve()
            # Read in batches: while work is held, wait for half the room to be free, not
            # for each outcome (a read per action costs what a batch read of a hundred does).
            if room <= reserve or (self._running and room < self.capacity() // 2):
                await self._room.wait()
                continue
            await self.link.up()
            self._reading = count = room - reserve
            try:
                got = await client.xreadgroup(
                    keys.group, self.name, streams={keys.stream: ">"}, count=count, block=_BLOCK_MS
                )
            except LOST as exc:
                self.link.lost(exc)
                continue
            except coredis.exceptions.RedisError as exc:
                await self.link.refused(exc, "XREADGROUP")
                continue
            finally:
                self._reading = 0
            if got and self.taking:
                for entries in got.values():
                    self._take([(e.identifier, e.field_values) for e in entries])

    def _take(self, entries: list[tuple[Any, Any]]) -> None:
        for entry, raw in entries:
            if entry in self.held:
                continue  # taken over from ourselves: it runs here already
            fields = entry_fields(raw)
            reply_to = fields.get(b"reply_to", b"")
            wants = bool(reply_to) and fields.get(b"progress") == b"1"
            mine = reply_to == self._mine
            held = _Held(entry, reply_to, fields.get(b"tag", b""), wants, mine=mine)
            self.held[entry] = held
            self._running += 1
            try:
                action = decode_json(fields[b"action"])
                timeout = float(fields[b"timeout"]) if b"timeout" in fields else None
                attempts = int(fields[b"max_attempts"]) if b"max_attempts" in fields else None
                job = self.pool.accept(action, self, entry, timeout=timeout, max_attempts=attempts)
            except _UNRUNNABLE as exc:
                why = (
                    exc
                    if isinstance(exc, BadRequest | ActionError)
                    else BadRequest(f"not an entry qoper8d can run: {exc!r}")
                )
                self._reply(held, False, _encode(why.to_wire()))
                continue
            except QueueFull as exc:
                self._reply(held, False, _encode(exc.to_wire()))
                continue
            held.job = job
            self.pool.enqueue(job)
        self._answer_mine()

    # The pool's sink: outcomes of the entries this node runs.

    def result(self, job: Job, payload: msgspec.Raw, worker: Any) -> None:
        self.results([job], [payload], worker)

    def results(self, jobs: list[Job], payloads: list[msgspec.Raw], worker: Any) -> None:
        held = self.held
        for job, payload in zip(jobs, payloads, strict=True):
            one = held.get(job.tag)
            if one is not None:
                self._reply(one, True, payload)
        self._answer_mine()

    def progress(self, job: Job, value: msgspec.Raw) -> None:
        """The handler reported progress: kept as the latest for its entry if its submitter
        asked, pushed by the replier before anything it pushes after."""
        held = self.held.get(job.tag)
        if held is not None and held.progress and not (held.done or held.lost):
            if held.mine:
                self.submits.progressed(held.ref.decode(errors="replace"), value)
                return
            tag = _encode(held.ref.decode(errors="replace"))
            line = b'{"tag":%b,"entry":"%b","progress":%b}' % (tag, held.entry, value)
            self._reports[held.entry] = (held, line)
            self._replier.wake()

    def error(self, job: Job, err: ActionError, worker: Any) -> None:
        held = self.held.get(job.tag)
        if held is None:
            return
        if held.lost:
            self._release(held)
        elif isinstance(err, ShuttingDown):
            # Never started here, and this node stops: back in the stream for the others.
            held.job = None
            self._done(held)
            self._replies.append((held, None))
            self._replier.wake()
        else:
            self._reply(held, False, _encode(err.to_wire()))
            self._answer_mine()

    def _reply(self, held: _Held, ok: bool, raw: bytes) -> None:
        """The outcome of `held`: for the replier to acknowledge and push; this node's own
        clients' answered at once (`_answer_mine`), before their acknowledgement."""
        if held.mine:
            self._answers.append((held.ref.decode(errors="replace"), ok, raw))
            line = b""
        else:
            line = self._line(held, ok, raw)
        self._replies.append((held, line))
        self._done(held)
        self._replier.wake()

    @staticmethod
    def _line(held: _Held, ok: bool, raw: bytes) -> bytes:
        """The reply pushed to the submitter of `held`: its result (ok) or error (raw JSON)."""
        ref = held.ref.decode(errors="replace")  # any client may have written it
        body = b'"ok":true,"result":%b' % raw if ok else b'"ok":false,"error":%b' % raw
        return b'{"tag":%b,"entry":"%b",%b}' % (_encode(ref), held.entry, body)

    def _answer_mine(self) -> None:
        if self._answers:
            answers, self._answers = self._answers, []
            self.submits.answered(answers)

    def _done(self, held: _Held) -> None:
        if not held.done:
            held.done = True
            self._running -= 1
            self._ended += 1
            self._room.wake()

    def _release(self, held: _Held) -> None:
        if self.held.pop(held.entry, None) is not None:
            self._done(held)
            self._room.wake()
            self._check_quiet()

    async def reply(self) -> None:
        """Acknowledge and push the outcomes that piled up, in one call per wake-up. Lost
        with Redis, they wait and are sent again once it is back: the script pushes a reply
        only with an entry's first acknowledgement, so sending twice never answers twice."""
        keys = self.keys
        while True:
            if self._reports:
                await self._report()
            if not self._replies:
                if not self._reports:
                    await self._replier.wait()
                continue
            batch = self._replies[: call_length(self._replies, _reply_size, self._reply_most)]
            answers = [(h, line) for h, line in batch if line is not None]
            back = [h.entry for h, line in batch if line is None]
            try:
                if answers:
                    flat: list[bytes] = []
                    for held, line in answers:
                        flat += (held.entry, held.reply_to if line else b"", line)
                    ttl = int(self.config.result_ttl * 1000)
                    args = [keys.group, ttl, REPLY_MAXLEN, pack(flat)]
                    await self.link.call("REPLY", [keys.stream], args)
                if back:
                    await self.link.call("REQUEUE", [keys.stream], [keys.group, *back])
            except Refused as exc:
                if exc.too_long and not self._shorten(batch):
                    await self.link.refused(exc, "REPLY")
                continue
            except Unavailable:
                await self.link.up()
                continue
            self._reply_most = min(CHUNK, self._reply_most * 2)
            del self._replies[: len(batch)]
            for held, _ in batch:
                self._release(held)

    def _shorten(self, batch: list[tuple[_Held, bytes | None]]) -> bool:
        """Redis refused a REPLY for its length (see `Refused`): half as many replies a call
        from now on (back up by doubling as calls pass), and a reply too long alone ends
        `bad_result` instead: its action ran, but its result cannot pass through this Redis.
        False if nothing was left to shorten."""
        if len(batch) > 1:
            self._reply_most = max(1, len(batch) // 2)
            return True
        ((held, line),) = batch
        if not line or held.mine:
            return False
        log.warning("cluster.reply_too_long", entry=held.entry.decode(), bytes=len(line))
        err = BadResult(
            f"its result, {len(line)} bytes as a reply, is longer than Redis takes in one "
            "argument (its proto-max-bulk-len)",
            bytes=len(line),
        )
        self._replies[0] = (held, self._line(held, False, _encode(err.to_wire())))
        return True

    async def _report(self) -> None:
        """Push the progress reports that piled up (best-effort: lost with Redis, they are
        dropped). Each goes only to an entry still pending, so never after its reply."""
        reports, self._reports = self._reports, {}
        ttl = int(self.config.result_ttl * 1000)
        args: list[Any] = [self.keys.group, ttl, REPLY_MAXLEN]
        for held, line in reports.values():
            args += [held.entry, held.reply_to, line]
        with contextlib.suppress(Unavailable):
            await self.link.call("PROGRESS", [self.keys.stream], args)

    async def keep(self) -> None:
        """Heartbeat, renew, take over, sweep: every `claim_idle / 3` seconds."""
        period = self.config.claim_idle / 3
        while True:
            await self.link.up()
            try:
                await self._beat()
                await self._renew()
                if self.taking:
                    await self._reclaim()
                await self.link.call(
                    "SWEEP",
                    [self.keys.stream, self.keys.nodes],
                    [self.keys.group, int(self.config.claim_idle * 3000)],
                )
            except Unavailable:
                continue
            await trio.sleep(period)

    async def _beat(self) -> None:
        keys = self.keys
        me = _encode(
            {
                "node": self.name,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "size": self.pool.size,
                "held": len(self.held),
            }
        )
        info, pending, waiting, dead = await self.link.call(
            "BEAT",
            [keys.stream, keys.nodes, keys.dead],
            [keys.group, self.name, me, self.config.claim_idle],
        )
        nodes = [decode_json(i) for i in info if i]
        self.seen = {"nodes": nodes, "pending": pending, "waiting": waiting, "dead": dead}

    async def _renew(self) -> None:
        held = [h.entry for h in self.held.values() if not h.lost]
        for start in range(0, len(held), CHUNK):
            lost = await self.link.call(
                "RENEW",
                [self.keys.stream],
                [self.keys.group, self.name, *held[start : start + CHUNK]],
            )
            self._stop_held(lost[::2])

    async def _reclaim(self) -> None:
        # The feeder's read is not waited for: it blocks while no new entry comes, and
        # what silent nodes held is older than any.
        room = self.room(reading=False)
        if room <= 0:
            return
        keys = self.keys
        cfg = self.config
        args = [keys.group, self.name, int(cfg.claim_idle * 1000), room, cfg.max_deliveries]
        args += [DEAD_MAXLEN, int(cfg.result_ttl * 1000), REPLY_MAXLEN]
        _, taken, poisoned, _ = await self.link.call("RECLAIM", [keys.stream, keys.dead], args)
        if taken or poisoned:
            log.info("cluster.taken_over", entries=len(taken), poisoned=poisoned)
        self._take([(e[0], e[1]) for e in taken])

    # -- running and stopping --------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            front = self.submits
            for task in (front.intake, front.cancel_entries, self.listen, self.reply, self.keep):
                nursery.start_soon(task)
            nursery.start_soon(self._feed_scoped)
            task_status.started()

    async def _feed_scoped(self) -> None:
        with self._feeder:
            await self.feed()

    def stop_taking(self) -> None:
        """The daemon stops: no new submits, no new entries; what is held finishes (or goes
        back to the stream: `error` with `shutting_down`)."""
        self.submits.stop()
        self.taking = False
        self._feeder.cancel()

    async def drained(self, *, tickets: bool = True) -> None:
        """Return once nothing is held, every reply is pushed and (with `tickets`) every
        submit of this node's clients is answered."""
        while self.held or self._replies or (tickets and self.submits.tickets):
            self._quiet = trio.Event()
            await self._quiet.wait()

    def _check_quiet(self) -> None:
        if self._quiet is not None and not (self.held or self._replies):
            self._quiet.set()

    def status(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": redacted(self.config.url),
            "stream": self.config.stream,
            "node": self.name,
            "connected": self.link.connected,
            "outages": self.link.outages,
            "held": len(self.held),
            "prefetch": self.prefetch,
            "awaiting": len(self.submits.tickets),
            **self.seen,
        }
