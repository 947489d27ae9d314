"""Output waiting as a list of byte chunks, sent a prefix at a time (the server's
connections and the clients alike: writev/sendmsg take many chunks in one call)."""

from __future__ import annotations

__all__ = ["consume"]


def consume(chunks: list[bytes], count: int) -> int:
    """`count` bytes from the front of `chunks` were sent: the chunks sent whole are
    removed; returns how much of the (new) first chunk was sent besides."""
    done = 0
    for chunk in chunks:
        if count < len(chunk):
            break
        count -= len(chunk)
        done += 1
    del chunks[:done]
    return count
