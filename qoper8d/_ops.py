"""The ops of docs/protocol.md, once for both clients: what each sends and how its result reads.

Each function here builds the `Request` for one op, its `Op` and its line; `Client.scale(n)`
is `self._call(_ops.scale(n))` and `AsyncClient.scale(n)` is
`await self._call(_ops.scale(n))`, so the two clients differ only in how they send and wait.
Sans-IO, like `qoper8d._protocol`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeAlias, TypeVar

import msgspec

__all__ = [
    "Op",
    "Request",
    "cancel",
    "drain",
    "hello",
    "reload",
    "scale",
    "shutdown",
    "status",
    "submit",
    "submit_fields",
]

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode


class Op(Generic[T]):
    """What an op is, whatever its parameters.

    `bounded`: the client's `timeout` bounds the wait for its answer (the daemon answers it
    by itself). `cancels`: a caller giving up on it (interrupted, cancelled) sends a
    `cancel` for it, so the action it started does not run on for nobody. `read` turns its
    result into the method's value (None: the result as it is).
    """

    __slots__ = ("bounded", "cancels", "name", "read")

    def __init__(
        self,
        name: str,
        read: Callable[[Any], T] | None,
        *,
        bounded: bool = True,
        cancels: bool = False,
    ) -> None:
        self.name = name
        self.read = read
        self.bounded = bounded
        self.cancels = cancels


#: One request: its op, and its line but for the id (`"op":"scale","size":2`). A tuple,
#: and the ops below made once: a submit costs no object of its own beyond its line.
Request: TypeAlias = tuple[Op[T], bytes]


def _mapping(result: Any) -> dict[str, Any]:
    value: dict[str, Any] = result
    return value


def _nothing(result: Any) -> None:
    return None


def _cancelled(result: Any) -> bool:
    return bool(result.get("cancelled"))


def _changed(result: Any) -> list[str]:
    return [str(line) for line in result.get("changed", [])]


_HELLO = Op("hello", _mapping)
_SUBMIT: Op[Any] = Op("submit", None, bounded=False, cancels=True)
_CANCEL = Op("cancel", _cancelled)
_STATUS = Op("status", _mapping)
_SCALE = Op("scale", _mapping)
_RELOAD = Op("reload", _changed, bounded=False)  # workers are replaced after their action
_DRAIN = Op("drain", _nothing, bounded=False)  # it waits for every accepted action
_SHUTDOWN = Op("shutdown", _nothing)


def _request(op: Op[T], **params: Any) -> Request[T]:
    return op, _encode({"op": op.name, **params})[1:-1]  # the fields, without the braces


def submit_fields(timeout: float | None, max_attempts: int | None) -> bytes:
    """A submit's optional fields, encoded once: a map splices them into every submit line."""
    fields = b""
    if timeout is not None:
        fields += b',"timeout":' + _encode(float(timeout))
    if max_attempts is not None:
        fields += b',"max_attempts":' + _encode(int(max_attempts))
    return fields


def submit(
    action: Any, timeout: float | None, max_attempts: int | None, progress: bool = False
) -> Request[Any]:
    no_fields = timeout is None and max_attempts is None  # the usual case: spare it a call
    fields = b"" if no_fields else submit_fields(timeout, max_attempts)
    if progress:
        fields += b',"progress":true'
    return _SUBMIT, b'"op":"submit"%b,"action":%b' % (fields, _encode(action))


def hello() -> Request[dict[str, Any]]:
    return _request(_HELLO)


def cancel(target: int | str) -> Request[bool]:
    return _request(_CANCEL, target=target)


def status() -> Request[dict[str, Any]]:
    return _request(_STATUS)


def scale(size: int) -> Request[dict[str, Any]]:
    return _request(_SCALE, size=size)


def reload() -> Request[list[str]]:
    return _request(_RELOAD)


def drain() -> Request[None]:
    return _request(_DRAIN)


def shutdown(grace: float | None) -> Request[None]:
    if grace is None:
        return _request(_SHUTDOWN)
    return _request(_SHUTDOWN, grace=float(grace))
