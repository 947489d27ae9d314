"""The channel's framing, sans-IO: what one side encodes the other decodes, in any chunking;
and what a real worker makes of a frame it cannot wholly decode."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

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


@pytest.mark.timeout(30)
def test_a_worker_refuses_only_the_action_it_cannot_decode() -> None:
    """Defence in depth: the pool never sends an action a worker cannot decode, but if it
    did, the worker refuses that one action (`Refused`) and runs the rest of its batch; it
    neither dies nor blames the actions around it."""
    batches_r, batches_w = os.pipe()
    answers_r, answers_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    spec = wire.WorkerSpec(
        from_master_fd=batches_r,
        to_master_fd=answers_w,
        lifeline_fd=lifeline_r,
        handler="handlers.echo:handle",
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "qoper8d.worker", msgspec.json.encode(spec).decode()],
        pass_fds=(batches_r, answers_w, lifeline_r),
        stdin=subprocess.DEVNULL,
    )
    for fd in (batches_r, answers_w, lifeline_r):
        os.close(fd)
    reader = wire.FrameReader(wire.FromWorker)
    answers = os.fdopen(answers_r, "rb", buffering=0)

    def next_messages(count: int) -> list[Any]:
        got: list[Any] = []
        while len(got) < count:
            data = answers.read(65536)
            assert data, f"the worker hung up after {got}"
            got += reader.feed(data)
        return got

    try:
        assert isinstance(next_messages(1)[0], wire.Ready)
        os.write(batches_w, b'[1,1,[{"a":1},"\xff",1e400,[2]]]\n' + wire.encode_batch(2, [b"3"]))
        done, refused, too_big, last, after = next_messages(5)
        assert done == wire.Done(msgspec.Raw(b'{"a":1}'))
        assert isinstance(refused, wire.Refused)
        assert "decode" in refused.message
        assert isinstance(too_big, wire.Refused)
        assert last == wire.Done(msgspec.Raw(b"[2]"))
        assert after == wire.Done(msgspec.Raw(b"3")), "the next batch runs as usual"
        os.write(batches_w, wire.encode_frame(wire.Stop()))
        assert worker.wait(10) == 0
    finally:
        worker.kill()
        worker.wait()
        for fd in (batches_w, lifeline_w):
            os.close(fd)
        answers.close()
