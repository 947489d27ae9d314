"""Every error qoper8d raises, in one tree.

    Qoper8Error                    base of everything below
    ├── ActionError                an accepted action ended without a result
    │   ├── HandlerError           handler_error   the handler raised (worker survives)
    │   ├── BadResult              bad_result      the result could not be encoded
    │   ├── WorkerLost             worker_lost     the worker died while running it
    │   ├── ActionTimeout          timeout         it ran past its deadline
    │   ├── ActionCancelled        cancelled       the submitter cancelled it
    │   ├── Poisoned               poisoned        it killed `poison_threshold` workers
    │   └── ShuttingDown           shutting_down   the pool stopped before it could run
    ├── RequestError               a request refused before it was accepted
    │   ├── QueueFull              queue_full
    │   ├── BadRequest             bad_request
    │   ├── UnknownOp              unknown_op
    │   ├── TooLarge               too_large
    │   └── Forbidden              forbidden
    ├── PoolError                  the pool itself cannot go on
    │   ├── WorkerStartError       worker_start_failed   handler import or setup() failed
    │   ├── RestartIntensityExceeded  restart_intensity  too many crashes in the window
    │   └── PoolClosed             pool_closed     the pool is not running
    ├── ConfigError                config_error    a configuration file or value is invalid
    └── ConnectError               the client cannot reach a daemon
        ├── NotRunning             not_running     no socket, or nobody listening on it
        ├── AccessDenied           access_denied   the socket exists but we may not use it
        └── ConnectTimeout         connect_timeout the daemon did not answer in time

Errors cross process and socket boundaries as data, never as pickles: `to_wire()` gives
`{"code", "message", ...details}` and `error_from_wire()` rebuilds the right class, so a
client catches `qoper8d.WorkerLost` exactly as an in-process caller does.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ACTION_ERROR_CODES",
    "AccessDenied",
    "ActionCancelled",
    "ActionError",
    "ActionTimeout",
    "BadRequest",
    "BadResult",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "Forbidden",
    "HandlerError",
    "NotRunning",
    "Poisoned",
    "PoolClosed",
    "PoolError",
    "Qoper8Error",
    "QueueFull",
    "RequestError",
    "RestartIntensityExceeded",
    "ShuttingDown",
    "TooLarge",
    "UnknownOp",
    "WorkerLost",
    "WorkerStartError",
    "error_from_wire",
    "single_error",
]


class Qoper8Error(Exception):
    """Base of every qoper8d error. `code` names it on the wire; `details` carries the rest."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_wire(self) -> dict[str, Any]:
        """The error as JSON-compatible data: code, message and details."""
        return {**self.details, "code": self.code, "message": self.message}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.details))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


def _rebuild(cls: type[Qoper8Error], message: str, details: dict[str, Any]) -> Qoper8Error:
    return cls(message, **details)


# -- outcomes of accepted actions (SPEC section 3) --------------------------------------------


class ActionError(Qoper8Error):
    """An accepted action ended without a result."""


class HandlerError(ActionError):
    """The handler raised. Details: `type` (the exception class name) and `traceback`."""

    code = "handler_error"

    @property
    def type(self) -> str:
        return str(self.details.get("type", ""))

    @property
    def traceback(self) -> str:
        return str(self.details.get("traceback", ""))


class BadResult(ActionError):
    """The handler returned something that is not JSON-compatible."""

    code = "bad_result"


class WorkerLost(ActionError):
    """The worker died while running the action. Details: `pid`, `exit_code` or `signal`."""

    code = "worker_lost"

    @property
    def pid(self) -> int | None:
        pid = self.details.get("pid")
        return int(pid) if pid is not None else None

    @property
    def exit_code(self) -> int | None:
        code = self.details.get("exit_code")
        return int(code) if code is not None else None

    @property
    def signal(self) -> str | None:
        sig = self.details.get("signal")
        return str(sig) if sig is not None else None


class ActionTimeout(ActionError):
    """The action ran past its deadline; its worker was killed and replaced."""

    code = "timeout"


class ActionCancelled(ActionError):
    """The submitter cancelled the action."""

    code = "cancelled"


class Poisoned(ActionError):
    """The action killed `poison_threshold` workers and will not be run again."""

    code = "poisoned"


class ShuttingDown(ActionError):
    """The pool is stopping: the action was refused, or still queued at the deadline."""

    code = "shutting_down"


ACTION_ERROR_CODES: frozenset[str] = frozenset(
    cls.code
    for cls in (
        HandlerError,
        BadResult,
        WorkerLost,
        ActionTimeout,
        ActionCancelled,
        Poisoned,
        ShuttingDown,
    )
)


# -- refusals ----------------------------------------------------------------------------------


class RequestError(Qoper8Error):
    """A request was refused before anything was accepted."""


class QueueFull(RequestError):
    """The pending queue holds `pool.max_queue` actions already."""

    code = "queue_full"


class BadRequest(RequestError):
    """The request is malformed: not JSON, a missing field, a wrong type."""

    code = "bad_request"


class UnknownOp(RequestError):
    """The request names an operation the server does not have."""

    code = "unknown_op"


class TooLarge(RequestError):
    """The request line is longer than `server.max_message_bytes`."""

    code = "too_large"


class Forbidden(RequestError):
    """The peer's uid is not allowed to use the socket."""

    code = "forbidden"


# -- the pool itself ---------------------------------------------------------------------------


class PoolError(Qoper8Error):
    """The pool cannot go on."""


class WorkerStartError(PoolError):
    """A worker could not start: the handler failed to import or its `setup()` raised."""

    code = "worker_start_failed"


class RestartIntensityExceeded(PoolError):
    """More than `supervisor.max_restarts` crashes within `supervisor.restart_window`."""

    code = "restart_intensity"


class PoolClosed(PoolError):
    """The pool is not running (not started yet, or closed)."""

    code = "pool_closed"


class ConfigError(Qoper8Error):
    """A configuration file or value is invalid. Details: `errors`, one line per problem."""

    code = "config_error"


# -- clients -----------------------------------------------------------------------------------


class ConnectError(Qoper8Error):
    """The client cannot talk to a daemon."""


class NotRunning(ConnectError):
    """No socket at the path, or nobody listening on it."""

    code = "not_running"


class AccessDenied(ConnectError):
    """The socket exists but this user may not open it."""

    code = "access_denied"


class ConnectTimeout(ConnectError):
    """The daemon did not answer in time."""

    code = "connect_timeout"


def _all_subclasses(cls: type[Qoper8Error]) -> list[type[Qoper8Error]]:
    found: list[type[Qoper8Error]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_BY_CODE: dict[str, type[Qoper8Error]] = {
    cls.code: cls for cls in _all_subclasses(Qoper8Error) if "code" in cls.__dict__
}


def error_from_wire(data: dict[str, Any]) -> Qoper8Error:
    """Rebuild an error from its wire form; an unknown code gives a plain `Qoper8Error`."""
    details = dict(data)
    code = str(details.pop("code", "error"))
    message = str(details.pop("message", code))
    cls = _BY_CODE.get(code)
    if cls is None:
        err = Qoper8Error(message, **details)
        err.code = code  # type: ignore[misc]  # keep the server's code for unknown errors
        return err
    return cls(message, **details)


def single_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one real error in an exception group (a nursery's), as callers expect to catch it.

    Cancellations are set aside, and several copies of one error (every slot failing to
    import the same handler) count as one. So do several `PoolError`s of one class whose
    messages differ (every slot's `setup()` timing out, each naming its slot): the first,
    which is the one that stopped the rest — a nursery lists its errors in the order they
    came. With several different errors, the group stays.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    import trio  # this module is imported by workers, which lack trio

    errors = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len({type(e) if isinstance(e, PoolError) else (type(e), str(e)) for e in errors}) == 1:
        return errors[0]
    if not errors and leaves:
        return leaves[0]
    return group
