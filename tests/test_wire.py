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
from qoper8d.stats import DurationCounts

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
            # Timings come with each batch's last answer; this test is about the answers.
            got += [m for m in reader.feed(data) if not isinstance(m, wire.Timed)]
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


def test_a_duration_lands_in_the_first_bucket_whose_bound_holds_it() -> None:
    bounds_ns = [round(b * 1e9) for b in wire.DURATION_BOUNDS]
    probes = [0, 1, 999, 1000, 3999, 4000, 4001, 7999, 8000, 8001, 1_000_000, 10**12]
    probes += [b + d for b in bounds_ns for d in (-1, 0, 1)]
    for ns in probes:
        expected = next((k for k, b in enumerate(bounds_ns) if ns <= b), len(bounds_ns))
        assert wire.duration_bucket(ns) == expected, ns


def test_split_timed_takes_every_timed_frame_out_and_keeps_the_rest_in_order() -> None:
    timed = wire.encode_timed(5, [0, 2])
    chunk = b"[12,1]\n" + timed + b"[12,2]\n" + timed + b'[15,"info","x",{}]\n' + timed
    split = wire.split_timed(chunk)
    assert split == (b'[12,1]\n[12,2]\n[15,"info","x",{}]\n', [timed] * 3)
    assert wire.split_timed(timed) == (b"", [timed])
    # A result that merely contains the bytes of a Timed tag is no Timed frame.
    assert wire.split_timed(b'[12,"[30,"]\n[12,[30,1]]\n') is None
    assert wire.FrameReader(wire.FromWorker).feed(timed) == [wire.Timed(5, [0, 2])]


def test_durations_merge_a_batch_at_a_time_and_refuse_what_no_worker_sends() -> None:
    counts = DurationCounts()
    counts.add(wire.Timed(3000, [0, 2, 24, 1]))
    counts.add(wire.Timed(1000, [0, 1]))
    snap = counts.snapshot()
    assert snap.counts[0] == 3
    assert snap.counts[24] == 1
    assert sum(snap.counts) == 4
    assert len(snap.counts) == len(wire.DURATION_BOUNDS) + 1
    assert snap.total == pytest.approx(4e-6)
    for forged in ([0], [25, 1], [-1, 1], [0, 0], [0, -3], [0, 1] * 26):
        with pytest.raises(wire.ProtocolError):
            counts.add(wire.Timed(1, forged))
    with pytest.raises(wire.ProtocolError):
        counts.add(wire.Timed(-1, []))
    with pytest.raises(wire.ProtocolError):
        counts.add_frames([b'[30,"soon",[]]\n'])
    assert counts.snapshot() == snap, "a refused frame counts nothing"
