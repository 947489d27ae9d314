"""The master–worker channel, sans-IO: message types and length-prefixed framing.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack (msgspec): one
tagged, array-like message. Nothing here touches a socket or an event loop, so the master
(trio) and the worker (plain blocking calls) share it unchanged.

Actions and results travel as JSON text inside the msgpack envelope. The daemon receives
actions as JSON and answers clients in JSON, so it can splice both through without decoding
them; only the worker and an in-process caller ever turn them into Python values.

Master → worker: `Batch` (actions to run in order, one at a time), `Stop` (graceful exit).
Worker → master: `Ready` (the handshake, after `setup()`), `StartFailed`, then exactly one of
`Done` / `Raised` / `Unencodable` per action of a batch, in batch order, each written before
the next action starts (so a dead worker's first unanswered action is the one that may have
run), plus `Log` (the worker's own structured events) and `Retire` (asks to be recycled).
Handler output on stdout/stderr never touches this channel: it has file descriptors of its
own.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "HEADER",
    "MAX_FRAME",
    "Batch",
    "Done",
    "FrameReader",
    "FromMaster",
    "FromWorker",
    "Log",
    "ProtocolError",
    "Raised",
    "Ready",
    "Retire",
    "StartFailed",
    "Stop",
    "Unencodable",
    "WorkerSpec",
    "encode_frame",
]

HEADER = 4
#: The largest frame either side accepts; anything longer means the stream is corrupt.
MAX_FRAME = 1 << 30


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame: its protocol state is in doubt."""


class _Message(msgspec.Struct, array_like=True, tag_field="kind"):
    """Base of every frame body: encoded as `[tag, field, ...]`."""


# -- master → worker ---------------------------------------------------------------------------


class Batch(_Message, tag=1):
    """Actions to run in order, one at a time. `seq` numbers batches per worker."""

    seq: int
    actions: list[bytes]


class Stop(_Message, tag=2):
    """Finish nothing new: run `teardown()` and exit 0."""


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
    """The next action of the batch returned `result` (JSON text)."""

    result: bytes


class Raised(_Message, tag=13):
    """The next action of the batch raised; the worker carries on."""

    type: str
    message: str
    traceback: str


class Unencodable(_Message, tag=14):
    """The next action of the batch returned something that is not JSON-compatible."""

    message: str


class Log(_Message, tag=15):
    """A structured event from the worker itself (not handler output)."""

    level: str
    event: str
    fields: dict[str, Any]


class Retire(_Message, tag=16):
    """The worker asks to be replaced between actions (e.g. its RSS passed the limit)."""

    reason: str


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker process needs to start, handed to it by the master."""

    channel_fd: int
    lifeline_fd: int
    handler: str
    routes: dict[str, str] = {}
    handler_path: list[str] = []
    async_backend: str = "trio"
    max_rss_bytes: int = 0


FromMaster = Batch | Stop
FromWorker = Ready | StartFailed | Done | Raised | Unencodable | Log | Retire

_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: FromMaster | FromWorker) -> bytes:
    """One complete frame: length prefix and msgpack body."""
    buf = bytearray(HEADER)
    _encoder.encode_into(message, buf, HEADER)
    buf[:HEADER] = (len(buf) - HEADER).to_bytes(HEADER, "big")
    return bytes(buf)


class FrameReader:
    """Reassembles frames from a byte stream and decodes them.

    Built for `recv_into`: `buffer()` hands out the free tail of a reused buffer, `commit(n)`
    accounts for the `n` bytes received into it and returns every message now complete.
    """

    __slots__ = ("_buf", "_decoder", "_end", "_start")

    def __init__(self, message_type: Any, size: int = 65536) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(message_type)
        self._buf = bytearray(size)
        self._start = 0  # first byte not yet decoded
        self._end = 0  # first free byte

    def buffer(self) -> memoryview:
        """Where to receive the next bytes: never empty."""
        if self._end == len(self._buf):
            self._make_room()
        return memoryview(self._buf)[self._end :]

    def feed(self, data: bytes) -> list[Any]:
        """`buffer()` + copy + `commit()`, for callers that already hold the bytes."""
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
        self._end += n
        buf = self._buf
        start = self._start
        end = self._end
        decode = self._decoder.decode
        out: list[Any] = []
        view = memoryview(buf)
        try:
            while end - start >= HEADER:
                size = int.from_bytes(buf[start : start + HEADER], "big")
                if size > MAX_FRAME:
                    raise ProtocolError(f"frame of {size} bytes is over the limit")
                stop = start + HEADER + size
                if stop > end:
                    break
                out.append(decode(view[start + HEADER : stop]))
                start = stop
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable frame: {exc}") from None
        finally:
            view.release()
        if start == end:
            start = end = 0
        self._start = start
        self._end = end
        return out

    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._end - self._start

    def _make_room(self) -> None:
        buf = self._buf
        pending = self._end - self._start
        if self._start:
            buf[:pending] = buf[self._start : self._end]
            self._start, self._end = 0, pending
        if self._end == len(buf):
            # A frame larger than the buffer: grow to hold it whole.
            need = HEADER
            if pending >= HEADER:
                need += int.from_bytes(buf[:HEADER], "big")
            buf.extend(bytes(max(len(buf), need - len(buf))))
