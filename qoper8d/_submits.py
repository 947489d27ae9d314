"""A cluster node's front side: its clients' submits, into the shared stream and answered.

Each submit of this node's socket becomes a `Ticket` until its reply comes back on this
node's reply list (docs/cluster.md). Two tasks, each batching all that piled up since it
last ran (one Redis call per wake-up, never one per action):

- intake: the submits of every connection since the last call, added in one script call
  (checked against `pool.max_queue` entries waiting in the stream), which also takes for
  this node as many waiting entries as it has room for (`claim`, then `taken`): so a node
  with idle workers runs its own submits without another round trip;
- canceller: the entries of cancelled submits and of clients gone away, removed (or, for
  an entry a node holds, its node told) in one script call.

`replied` answers the clients from what the node's listener read off the reply list:
outcomes, and progress reports for the submits that asked for them (SPEC 9); `answered` and
`progressed` do the same for the entries this node ran itself, with no trip through Redis.

Bound: this node's submits waiting for an answer, 2 x `pool.max_queue` (then
`queue_full`): as many waiting in the stream as it takes, and as many running anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import structlog

from qoper8d._jobs import Job, encode_action
from qoper8d._link import Link, Refused, redacted
from qoper8d._streams import call_length, decode_reply, pack
from qoper8d._wakeup import Wakeup
from qoper8d.config import ClusterConfig
from qoper8d.errors import ActionCancelled, BadRequest, QueueFull, ShuttingDown, Unavailable

__all__ = ["CHUNK", "Submits", "Ticket"]

log = structlog.get_logger("qoper8d.cluster")

#: Most submits one intake call adds (and most entries one cancel call names, most replies
#: one replier call pushes): a script call holds Redis for its length, so other nodes wait
#: no longer than that.
CHUNK = 1000
_encode = msgspec.json.Encoder().encode


def _payload_size(ticket: Ticket) -> int:
    return len(ticket.payload)


class Ticket(Job, gc=False, eq=False):
    """A submit of this node's client, as its connection holds it, until its reply."""

    #: Its tag in the entry and the reply (this node's start token and a count).
    ref: str = ""
    #: Its entry id, once the intake has added it.
    entry: bytes = b""
    #: Its client went away before it was added: its entry is withdrawn, not cancelled.
    withdrawn: bool = False
    #: Its client asked for progress lines (the entry says so to the node that runs it).
    progress: bool = False


class Submits:
    """This node's clients' submits (see the module docstring). `on_answer` runs after
    each answer, so that a stopping node learns when the last one is out. Before each
    intake call `claim()` says how many entries the node takes in that call; after it,
    `taken` gets what it took (an empty list if the call failed)."""

    def __init__(
        self,
        link: Link,
        config: ClusterConfig,
        boot: str,
        max_queue: int,
        on_answer: Callable[[], None],
        claim: Callable[[], int] = lambda: 0,
        taken: Callable[[list[Any]], None] = lambda entries: None,
    ) -> None:
        self.link = link
        self.keys = link.keys
        self.config = config
        self.max_queue = max_queue
        self._boot = boot
        self._count = 0
        self._on_answer = on_answer
        self._claim = claim
        self._taken = taken
        #: This node's submits waiting for a reply, by ref.
        self.tickets: dict[str, Ticket] = {}
        self._intake: list[Ticket] = []
        #: The most submits one call carries now: `CHUNK`, halved by each refusal for
        #: length (a Redis whose proto-max-bulk-len was lowered), doubled by each success.
        self._most = CHUNK
        self._intake_wake = Wakeup()
        self._cancels: list[tuple[bytes, bool]] = []
        self._canceller = Wakeup()
        self.accepting = True

    def submit(
        self,
        conn: Any,
        id_json: bytes,
        action: Any,
        timeout: float | None = None,
        max_attempts: int | None = None,
        *,
        progress: bool = False,
    ) -> Ticket:
        """Accept a submit for the stream; its answer goes to `conn`. Raises at once, taking
        nothing: `ShuttingDown`, `Unavailable` (Redis is lost), `QueueFull`, `BadRequest`."""
        if not self.accepting:
            raise ShuttingDown("the daemon is stopping")
        if not self.link.connected:
            raise Unavailable(
                f"this node has lost Redis ({redacted(self.config.url)}); it is reconnecting"
            )
        if len(self.tickets) >= 2 * self.max_queue:
            raise QueueFull(
                f"{len(self.tickets)} submits of this node wait for their answer",
                max_queue=self.max_queue,
            )
        payload = encode_action(action)
        if timeout is not None and not 0 <= timeout <= 1e9:
            raise BadRequest("timeout must be a number of seconds >= 0")
        self._count += 1
        ref = f"{self._boot}.{self._count}"
        ticket = Ticket(payload, conn, id_json, ref=ref, progress=progress)
        if timeout is not None:
            ticket.timeout = timeout
        if max_attempts is not None:
            ticket.max_attempts = max_attempts
        self.tickets[ref] = ticket
        conn.pending[id_json] = ticket
        if progress:
            conn.watch(id_json)
        self._intake.append(ticket)
        self._intake_wake.wake()
        return ticket

    def cancel(self, ticket: Any) -> None:
        """The client cancels a submit: an entry nobody took is removed, a held one's node
        is told (docs/cluster.md). Answered `cancelled` here, at once."""
        if not isinstance(ticket, Ticket) or self.tickets.pop(ticket.ref, None) is None:
            return
        if ticket.entry:
            self._cancels.append((ticket.entry, True))
            self._canceller.wake()
        else:
            ticket.cancelled = True  # the intake skips it
        self._answer(ticket, ActionCancelled("cancelled by the submitter").to_wire())

    def withdraw(self, conn: Any) -> None:
        """The client is gone: entries nobody took are removed; taken ones finish unseen."""
        for ticket in list(conn.pending.values()):
            if isinstance(ticket, Ticket) and self.tickets.pop(ticket.ref, None) is not None:
                if ticket.entry:
                    self._cancels.append((ticket.entry, False))
                else:
                    ticket.cancelled = ticket.withdrawn = True
        self._canceller.wake()
        self._on_answer()

    def _answer(self, ticket: Ticket, wire: dict[str, Any]) -> None:
        conn = ticket.sink
        conn.pending.pop(ticket.tag, None)  # type: ignore[attr-defined]
        line = b'{"id":%b,"ok":false,"error":%b}\n' % (ticket.tag, _encode(wire))
        if ticket.progress:
            line = conn.unwatch(ticket.tag) + line  # type: ignore[attr-defined]
        conn.send(line)  # type: ignore[attr-defined]
        self._on_answer()

    def refuse(self, ticket: Ticket, err: Exception) -> None:
        """Answer `ticket` with `err`, unless it has its answer already."""
        if self.tickets.pop(ticket.ref, None) is not None:
            wire = err.to_wire() if hasattr(err, "to_wire") else {"message": str(err)}
            self._answer(ticket, wire)

    async def intake(self) -> None:
        """Add the submits that piled up, in one script call per wake-up."""
        keys = self.keys
        while True:
            if not self._intake:
                await self._intake_wake.wait()
                continue
            n = call_length(self._intake, _payload_size, self._most)
            batch = [t for t in self._intake[:n] if not t.cancelled]
            del self._intake[:n]
            if not batch:
                continue
            take = self._claim()
            entries = []
            for t in batch:
                fields = [b"action", t.payload, b"reply_to", keys.reply, b"tag", t.ref]
                if t.timeout:
                    fields += [b"timeout", repr(t.timeout)]
                if t.max_attempts:
                    fields += [b"max_attempts", str(t.max_attempts)]
                if t.progress:
                    fields += [b"progress", b"1"]
                entries.append(fields)
            args = [keys.group, self.max_queue, keys.node, take, pack(entries)]
            try:
                ids, taken = await self.link.call("SUBMIT", [keys.stream], args)
            except Unavailable as exc:
                self._taken([])
                if isinstance(exc, Refused) and exc.too_long:
                    self._shorten(batch)
                    continue
                # The call may have run: the entries may be in the stream. The client is
                # told so; a reply that comes all the same is dropped (its ref is gone).
                exc.details["in_doubt"] = True
                for t in batch:
                    self.refuse(t, exc)
                continue
            self._most = min(CHUNK, self._most * 2)
            for t, entry in zip(batch, ids, strict=True):
                if entry == 0:
                    full = f"{self.max_queue} entries wait in the stream already"
                    self.refuse(t, QueueFull(full, max_queue=self.max_queue))
                elif t.cancelled:  # cancelled, or its client gone, while it was added
                    self._cancels.append((entry, not t.withdrawn))
                    self._canceller.wake()
                else:
                    t.entry = entry
            self._taken(taken)

    def _shorten(self, batch: list[Ticket]) -> None:
        """Redis refused a SUBMIT for its length (see `Refused`) and ran none of it: the
        same submits go again, half as many a call (back up by doubling as calls pass); one
        too long alone is refused, not in doubt."""
        if len(batch) > 1:
            self._most = max(1, len(batch) // 2)
            self._intake[:0] = batch
            return
        (ticket,) = batch
        why = (
            f"the action, {len(ticket.payload)} bytes, is longer than Redis takes in one "
            "argument (its proto-max-bulk-len)"
        )
        self.refuse(ticket, Unavailable(why, too_long=True))

    def replied(self, values: list[bytes]) -> None:
        """Answer this node's clients from what its reply list held: one write per
        connection for the whole read, not one per answer."""
        answers = []
        for value in values:
            try:
                reply = decode_reply(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("cluster.bad_reply", reply=value[:200])
                continue
            if reply.ok is None:  # a progress report: sent on if its submit asked
                # Before its own answer, which is later in the list: all it must precede.
                self.progressed(reply.tag, reply.progress)
            else:
                answers.append((reply.tag, reply.ok, reply.result if reply.ok else reply.error))
        self.answered(answers)

    def progressed(self, ref: str, value: msgspec.Raw) -> None:
        """A progress report for the submit `ref`: sent on if it asked for them."""
        ticket = self.tickets.get(ref)
        if ticket is not None and ticket.progress:
            ticket.sink.progress(ticket, value)  # type: ignore[attr-defined]

    def answered(self, answers: Iterable[tuple[str, bool, bytes]]) -> None:
        """Answer the submits named by ref, each with its result (ok) or error (raw JSON):
        one write per connection for them all. A ref no longer waiting is skipped: a late
        second reply, a cancelled submit's, or a past life's."""
        lines: dict[Any, list[bytes]] = {}
        for ref, ok, body in answers:
            ticket = self.tickets.pop(ref, None)
            if ticket is None:
                continue
            conn: Any = ticket.sink
            conn.pending.pop(ticket.tag, None)
            if ok:
                line = b'{"id":%b,"ok":true,"result":%b}\n' % (ticket.tag, body)
            else:
                line = b'{"id":%b,"ok":false,"error":%b}\n' % (ticket.tag, body)
            if ticket.progress:
                line = conn.unwatch(ticket.tag) + line
            lines.setdefault(conn, []).append(line)
        for conn, some in lines.items():
            conn.send(b"".join(some))
        self._on_answer()

    async def cancel_entries(self) -> None:
        """Remove (or withdraw) the entries of cancelled submits, in one call per wake-up."""
        keys = self.keys
        while True:
            if not self._cancels:
                await self._canceller.wait()
                continue
            batch, self._cancels = self._cancels[:CHUNK], self._cancels[CHUNK:]
            for mode in ("cancel", "withdraw"):
                ids = [entry for entry, hard in batch if hard == (mode == "cancel")]
                if not ids:
                    continue
                ttl = int(self.config.result_ttl * 1000)
                args = [keys.group, keys.control_prefix, mode, ttl, *ids]
                try:
                    await self.link.call("CANCEL", [keys.stream], args)
                except Unavailable:
                    await self.link.up()  # the entries run, their replies are dropped

    def stop(self) -> None:
        """The daemon stops: no new submits; those not added yet are refused."""
        self.accepting = False
        for ticket in self._intake:
            self.refuse(ticket, ShuttingDown("the daemon is stopping"))
        self._intake.clear()

    def give_up(self) -> None:
        """The grace period is over: the submits still unanswered end `shutting_down` (their
        entries stay in the stream and run elsewhere; their replies expire)."""
        for ticket in list(self.tickets.values()):
            self.refuse(ticket, ShuttingDown("the daemon stopped before the answer came"))
