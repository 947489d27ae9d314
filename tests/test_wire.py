"""The channel's framing, sans-IO: what one side encodes the other decodes, in any chunking."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qoper8d import wire

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def test_batch_carries_actions_as_json_untouched() -> None:
    actions = [b'{"x":1}', b"[1,2]", b'"text"', b"null"]
    frame = wire.encode_batch(7, actions)
    (batch,) = wire.FrameReader(wire.FromMaster).feed(frame)
    assert batch == wire.Batch(7, [{"x": 1}, [1, 2], "text", None])


def test_done_keeps_the_result_as_raw_json() -> None:
    (done,) = wire.FrameReader(wire.FromWorker).feed(wire.encode_done(b'{"a":[1,2]}'))
    assert isinstance(done, wire.Done)
    assert bytes(done.result) == b'{"a":[1,2]}'


@given(
    results=st.lists(json_values, min_size=1, max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_any_chunking_gives_the_same_messages(results: list[object], cuts: list[int]) -> None:
    frames = [wire.encode_done(msgspec.json.encode(r)) for r in results]
    frames.insert(len(frames) // 2, wire.encode_frame(wire.Log("info", "hello", {"n": 1})))
    stream = b"".join(frames)
    reader = wire.FrameReader(wire.FromWorker, size=64)
    got = []
    offset = 0
    for cut in [*cuts, len(stream)]:
        got.extend(reader.feed(stream[offset : offset + cut]))
        offset += cut
        if offset >= len(stream):
            break
    assert reader.pending() == 0
    decoded = [msgspec.json.decode(m.result) for m in got if isinstance(m, wire.Done)]
    assert decoded == results
    assert [m for m in got if isinstance(m, wire.Log)] == [wire.Log("info", "hello", {"n": 1})]


def test_a_frame_larger_than_the_buffer_grows_it() -> None:
    big = "x" * 200_000
    reader = wire.FrameReader(wire.FromWorker, size=1024)
    (done,) = reader.feed(wire.encode_done(msgspec.json.encode(big)))
    assert msgspec.json.decode(done.result) == big


def test_every_message_type_round_trips() -> None:
    messages: list[wire.FromWorker] = [
        wire.Ready(123),
        wire.StartFailed("ImportError", "no module", "Traceback ..."),
        wire.Raised("ValueError", "boom", "Traceback ..."),
        wire.Unencodable("TypeError: object"),
        wire.Log("warning", "worker.thing", {"a": [1, "b"]}),
        wire.Retire("rss over 1 bytes"),
    ]
    stream = b"".join(wire.encode_frame(m) for m in messages)
    assert wire.FrameReader(wire.FromWorker).feed(stream) == messages
    assert wire.FrameReader(wire.FromMaster).feed(wire.encode_frame(wire.Stop())) == [wire.Stop()]


@pytest.mark.parametrize(
    "garbage",
    [b"not json\n", b'[99,"unknown tag"]\n', b"[12]\n", b'{"kind":12}\n', b"\xff\xfe\n"],
)
def test_a_corrupt_frame_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader(wire.FromWorker).feed(garbage)


def test_a_batch_frame_is_never_mistaken_for_an_answer() -> None:
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader(wire.FromWorker).feed(wire.encode_batch(1, [b"1"]))
