"""The master-worker channel, sans-IO: message types and their framing.

Nothing here touches a descriptor or an event loop, so the master (trio) and the worker
(plain blocking calls) share it unchanged.

A frame is one line of JSON holding one tagged, array-like msgspec message: `[tag, ...]\\n`.
Lines, not length-prefixed msgpack: JSON text never holds a raw newline, so the end of the
last complete frame is one `rfind`, and `msgspec.json.Decoder.decode_lines` decodes every
complete frame of a read in a single call. Measured on the answer path (200 answers a read):
0.93 µs an answer with length-prefixed msgpack frames, 0.49 µs with a bulk msgpack decode
behind a Python scan for the boundaries, 0.22 µs with lines. A read that holds nothing but
answers, as in bulk, does better still: `join_done` turns it into one JSON array with two
C-level byte scans, and one decode yields every result (0.07 µs an answer where decoding
each frame and then its result cost 0.23 µs). Actions and results are JSON already, so they
travel as raw JSON text inside the frames: the daemon passes a client's action to the
worker and a worker's result to the client without decoding either.

The channel is a pair of pipes, one each way. Pipes, not a socketpair: the kernel merges a
worker's many small answer writes into shared pages, where a Unix socket allocates a buffer
per write; reading 200 answers cost 60 times more from a socket, writing one 3 times more.

Master → worker: `Batch` (actions to run in order, one at a time), `Stop` (graceful exit).
Worker → master: `Ready` (the handshake, after `setup()`), `StartFailed`, then exactly one of
`Done` / `Raised` / `Unencodable` per action of a batch, in batch order, each written before
the next action starts (so a dead worker's first unanswered action is the one that may have
run), plus `Log` (the worker's own structured events), `Retire` (asks to be recycled), `Cut`
(the rest of this batch did not start: its results so far passed the batch's budget),
`Timed` (how long the actions answered since the last `Timed` ran) and `Progress` (what
the handler reported of the action now running: the next one to be answered).
Handler output on stdout/stderr never touches the channel: it has descriptors of its own.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "DURATION_BOUNDS",
    "MAX_FRAME",
    "MAX_PROGRESS_BYTES",
    "REPORT_INTERVAL",
    "Batch",
    "Cut",
    "Done",
    "FrameReader",
    "FromMaster",
    "FromWorker",
    "Log",
    "Progress",
    "ProtocolError",
    "Raised",
    "RawBatch",
    "Ready",
    "Refused",
    "Retire",
    "StartFailed",
    "Stop",
    "Timed",
    "Unencodable",
    "WorkerSpec",
    "ZygoteSpec",
    "bucket_of_bits",
    "duration_bucket",
    "encode_batch",
    "encode_frame",
    "encode_progress",
    "encode_timed",
    "join_done",
    "split_timed",
]

#: The longest frame either side accepts; anything longer means the stream is corrupt.
MAX_FRAME = 1 << 30
#: The longest progress value (as JSON) a handler may report: a status, not a payload. A
#: longer one raises `ValueError` in the handler; a `Progress` frame carrying one is a
#: protocol error.
MAX_PROGRESS_BYTES = 4096
#: Seconds between a worker's unprompted reports: its `Timed` frames during a long batch,
#: and the progress frames a handler's reports are coalesced into.
REPORT_INTERVAL = 0.05

#: Upper bounds, in seconds, of the buckets that count how long actions ran on a worker:
#: powers of two from 4 µs to about 33 s, then one bucket for everything longer.
DURATION_BOUNDS: tuple[float, ...] = tuple(2**k / 1_000_000 for k in range(2, 26))


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: its protocol state is in doubt."""


class _Message(msgspec.Struct, array_like=True, tag_field="kind", gc=False):
    """Base of every frame: encoded as `[tag, field, ...]`. Untracked by the GC: a message
    never refers back to anything that refers to it."""


# -- master → worker ---------------------------------------------------------------------------


class Batch(_Message, tag=1):
    """Actions to run in order, one at a time. `seq` numbers batches per worker."""

    seq: int
    actions: list[Any]


class RawBatch(_Message, tag=1):
    """A `Batch` whose actions are left undecoded: how a worker reads a batch that would not
    decode whole, to tell the one action it cannot decode from the others."""

    seq: int
    actions: list[msgspec.Raw]


class Stop(_Message, tag=2):
    """Start nothing new: run `teardown()` and exit 0."""


# -- worker → master ---------------------------------------------------------------------------


class Ready(_Message, tag=10):
    """The handshake: the handler imported and `setup()` returned."""

    pid: int


class StartFailed(_Message, tag=11):
    """The handler could not be imported or `setup()` raised; the worker exits next."""

    type: str
    message: str
    traceback: str


class Done(_Message, tag=12):
    """The next action of the batch returned `result` (raw JSON text)."""

    result: msgspec.Raw


class Raised(_Message, tag=13):
    """The next action of the batch raised; the worker carries on."""

    type: str
    message: str
    traceback: str


class Unencodable(_Message, tag=14):
    """The next action of the batch returned something that is not JSON-compatible."""

    message: str


class Refused(_Message, tag=18):
    """The next action of the batch could not be decoded here, so it never ran. The master
    never sends such an action (it encodes every action itself): this is a master's bug,
    reported for that one action; the worker carries on with the rest."""

    message: str


class Log(_Message, tag=15):
    """A structured event from the worker itself (not handler output)."""

    level: str
    event: str
    fields: dict[str, Any]


class Retire(_Message, tag=16):
    """The worker asks to be replaced between actions (e.g. its RSS passed the limit)."""

    reason: str


class Cut(_Message, tag=17):
    """The worker stops this batch here: the results it wrote passed `batch_result_bytes`.
    The rest of the batch never started; the worker takes the next batch as usual."""


class Progress(_Message, tag=19):
    """The handler reported `value` (raw JSON text) on the action now running."""

    value: msgspec.Raw


class Timed(_Message, tag=30):
    """How long the actions counted since the previous `Timed` ran on the worker: `total`
    nanoseconds in all, and `counts` as flat pairs `[bucket, actions, bucket, actions,
    ...]`, `bucket` an index into `DURATION_BOUNDS` (its length for actions longer than
    every bound). A worker counts each action where it times it and sends one `Timed` just
    before the answer that ends a batch (so a batch's last outcome never overtakes its
    timings), and one mid-batch at most every `REPORT_INTERVAL` seconds."""

    total: int
    counts: list[int]


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker process needs to start, handed to it by the master."""

    #: The worker reads batches from this pipe...
    from_master_fd: int
    #: ...and writes its answers to this one.
    to_master_fd: int
    lifeline_fd: int
    handler: str
    routes: dict[str, str] = {}
    handler_path: list[str] = []
    async_backend: str = "trio"
    max_rss_bytes: int = 0
    #: Seconds to poll for the next batch before blocking (see `pool.idle_spin`).
    idle_spin: float = 0.0
    #: The longest result (encoded) it may send (`pool.max_result_bytes`): longer is bad_result.
    max_result_bytes: int = 1 << 30
    #: Stop a batch (`Cut`) once its results pass this many bytes, so that a batch of
    #: actions with unexpectedly large results never piles up in the master.
    batch_result_bytes: int = 1 << 20
    #: The pool's slot it serves in (its process title says so).
    slot: int = -1


# -- master <-> fork server ----------------------------------------------------------------------


class Fork(_Message, tag=20):
    """Fork a worker. Its descriptors ride along (SCM_RIGHTS): stdout, stderr, batches,
    answers, lifeline, in that order."""

    spec: WorkerSpec


class Forked(_Message, tag=21):
    """The worker of the oldest pending `Fork` runs as `pid`; a pidfd for it rides along."""

    pid: int


class Exited(_Message, tag=22):
    """A forked worker exited (and its process group was killed); exactly one of the two."""

    pid: int
    exit_code: int | None
    signal: int | None


class ZygoteSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the fork server needs: its descriptors and the modules to import before forking."""

    control_fd: int
    lifeline_fd: int
    preload: list[str] = []
    handler_path: list[str] = []


FromMaster = Batch | Stop
FromWorker = (
    Ready
    | StartFailed
    | Done
    | Raised
    | Unencodable
    | Refused
    | Log
    | Retire
    | Cut
    | Progress
    | Timed
)
ToZygote = Fork | Stop
FromZygote = Ready | Forked | Exited | Log

_encoder = msgspec.json.Encoder()


def encode_frame(message: _Message) -> bytes:
    """One complete frame."""
    return _encoder.encode(message) + b"\n"


def encode_batch(seq: int, actions: list[bytes]) -> bytes:
    """A `Batch` frame from actions already encoded as JSON: joined, never re-encoded."""
    return b"[1,%d,[%b]]\n" % (seq, b",".join(actions))


def encode_done(result: bytes) -> bytes:
    """A `Done` frame from a result already encoded as JSON."""
    return b"[12,%b]\n" % result


def encode_timed(total: int, counts: list[int]) -> bytes:
    """A `Timed` frame (its fields as `Timed` has them)."""
    return b"[30,%d,[%b]]\n" % (total, b",".join(b"%d" % n for n in counts))


def encode_progress(value: bytes) -> bytes:
    """A `Progress` frame from a value already encoded as JSON."""
    return b"[19,%b]\n" % value


def duration_bucket(ns: int) -> int:
    """The bucket (an index into `DURATION_BOUNDS`, its length past every bound) of an
    action that ran `ns` nanoseconds: exact to the nanosecond, in integers. A worker counts
    `((ns - 1) // 1000).bit_length()`, the least `k` with `2**k` µs >= `ns`, and maps it
    here (`bucket_of_bits`) once per batch rather than once per action."""
    return bucket_of_bits(((ns - 1) // 1000).bit_length())


def bucket_of_bits(bits: int) -> int:
    """The bucket of actions a worker counted under `bits` (see `duration_bucket`): the
    bound `2**bits` µs is `DURATION_BOUNDS[bits - 2]`; below 4 µs is the first bucket."""
    return min(max(bits - 2, 0), len(DURATION_BOUNDS))


_TIMED = b"[30,"
_TIMED_SEAM = b"\n[30,"


def _timed_after(chunk: bytes, offset: int) -> int:
    """Where the first `Timed` frame after the newline at or past `offset` starts, or -1."""
    at = chunk.find(_TIMED_SEAM, offset)
    return at + 1 if at >= 0 else -1


def split_timed(chunk: bytes) -> tuple[bytes, list[bytes]] | None:
    """The complete frames of `chunk` without their `Timed` frames, and those (None if it
    has none): what lets a read that ends a batch, its answers and one `Timed`, still take
    `join_done`'s path. A frame starts `[30,` only if it is a `Timed` (no raw newline occurs
    inside a frame, so `\\n[30,` is always a frame's start)."""
    at = 0 if chunk.startswith(_TIMED) else _timed_after(chunk, 0)
    if at < 0:
        return None
    rest: list[bytes] = []
    timed: list[bytes] = []
    start = 0
    while at >= 0:
        end = chunk.index(b"\n", at) + 1
        rest.append(chunk[start:at])
        timed.append(chunk[at:end])
        start = end
        at = _timed_after(chunk, end - 1)
    rest.append(chunk[start:])
    return b"".join(rest), timed


_DONE_START = b"[12,"
_DONE_SEAM = b"]\n[12,"


def join_done(chunk: bytes) -> bytes | None:
    """If the complete frames in `chunk` are all `Done`: their results as one JSON array,
    `[12, result, result, ...]`, made without decoding anything; else None.

    A raw newline never occurs inside an encoded frame, so `]\\n[12,` can only be the seam
    between a frame and a following `Done`: replacing every seam with a comma joins a run of
    `Done` frames into one array, which a single decode turns into the run's results. In bulk
    this is what every read holds, at a third of the cost of decoding the frames one by one.
    The caller checks that the array holds one result per frame (`chunk.count(b"\\n")`).
    """
    joined = chunk.replace(_DONE_SEAM, b",")
    if joined.startswith(_DONE_START) and joined.find(b"\n") == len(joined) - 1:
        return joined
    return None


class FrameReader:
    """Reassembles frames from a byte stream and decodes them, a whole read at a time.

    Built for reading into a reused buffer: `buffer()` hands out its free tail, `commit(n)`
    accounts for the `n` bytes received into it and returns every message now complete.
    """

    __slots__ = ("_buf", "_decode", "_decode_lines", "_end", "_max_frame", "_scanned", "_start")

    def __init__(self, message_type: Any, size: int = 65536, max_frame: int = MAX_FRAME) -> None:
        self._decode_lines = msgspec.json.Decoder(message_type).decode_lines
        self._decode = msgspec.json.Decoder(message_type).decode
        self._max_frame = max_frame
        self._buf = bytearray(size)
        self._start = 0  # first byte not yet decoded
        self._scanned = 0  # no newline before this offset since _start
        self._end = 0  # first free byte

    def buffer(self) -> memoryview:
        """Where to receive the next bytes: never empty."""
        if self._end == len(self._buf):
            self._make_room()
        return memoryview(self._buf)[self._end :]

    def feed(self, data: bytes) -> list[Any]:
        """`buffer()`, copy and `commit()`, for callers that already hold the bytes."""
        out: list[Any] = []
        offset = 0
        while offset < len(data):
            with self.buffer() as room:
                n = min(len(room), len(data) - offset)
                room[:n] = data[offset : offset + n]
            offset += n
            out.extend(self.commit(n))
        return out

    def commit(self, n: int) -> list[Any]:
        """Account for `n` received bytes; decode and return every complete message."""
        chunk = self.take(n)
        return self.decode(chunk) if chunk else []

    def take(self, n: int) -> bytes:
        """Account for `n` received bytes; return every complete frame, undecoded (b"" if
        there is none yet)."""
        start = self._start
        end = self._end = self._end + n
        buf = self._buf
        last = buf.rfind(b"\n", self._scanned, end)
        if last < 0:
            self._scanned = end
            if end - start > self._max_frame:
                raise ProtocolError(f"a frame longer than {self._max_frame} bytes")
            return b""
        # A copy: decoded messages may keep views of it (raw JSON results), and this buffer
        # is reused by the next read.
        chunk = bytes(buf[start : last + 1])
        if last + 1 == end:
            self._start = self._scanned = self._end = 0
        else:
            self._start = self._scanned = last + 1
        return chunk

    def decode(self, chunk: bytes) -> list[Any]:
        """The messages of `chunk`, complete frames from `take()`. A frame nested too
        deeply to decode here raises `RecursionError` (see `decode_each`)."""
        try:
            return self._decode_lines(chunk)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable frame: {exc}") from None

    def decode_each(self, chunk: bytes, too_deep: Any) -> list[Any]:
        """`decode`, a frame at a time, with `too_deep` in place of each frame nested too
        deeply to decode here (a result can be deeper than this process's stack allows)."""
        out: list[Any] = []
        for line in chunk.splitlines():
            try:
                out.append(self._decode(line))
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            except RecursionError:
                out.append(too_deep)
        return out

    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._end - self._start

    def _make_room(self) -> None:
        buf = self._buf
        pending = self._end - self._start
        if self._start:
            buf[:pending] = buf[self._start : self._end]
            self._scanned -= self._start
            self._start, self._end = 0, pending
        if self._end == len(buf):
            # A frame longer than the buffer: grow it.
            buf.extend(bytes(len(buf)))
