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
    │   ├── Forbidden              forbidden
    │   └── Unavailable            unavailable     the shared queue (Redis) cannot be reached
    ├── PoolError                  the pool itself cannot go on
    │   ├── WorkerStartError       worker_start_failed   handler import or setup() failed
    │   ├── RestartIntensityExceeded  restart_intensity  too many crashes in the window
    │   └── PoolClosed             pool_closed     the pool is not running
    ├── ConfigError                config_error    a configuration file or value is invalid
    └── ConnectError               the client cannot reach a daemon
        ├── NotRunning             not_running     no socket, or nobody listening on it
        ├── AccessDenied           access_denied   the socket exists but we may not use it
        └── ConnectTimeout         connect_timeout the daemon did not answer in time

Every public name here is the package's too (`qoper8d.WorkerLost`). Errors cross process
and socket boundaries as data, never as pickles: `to_wire()` gives
`{"code", "message", ...details}` and `error_from_wire()` rebuilds the right class, so a
client catches `qoper8d.WorkerLost` exactly as an in-process caller does.
"""

from __future__ import annotations

from typing import Any, ClassVar

#: Every error class with a code of its own, by that code (filled as they are defined).
_BY_CODE: dict[str, type[Qoper8Error]] = {}


class Qoper8Error(Exception):
    """Base of every qoper8d error. `code` names it on the wire; `details` carries the rest."""

    code: ClassVar[str] = "error"

    def __init_subclass__(cls, code: str | None = None, **kwargs: Any) -> None:
        """`class X(Parent, code="x")`: an error that crosses the wire as `x`."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
            _BY_CODE[code] = cls

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


class HandlerError(ActionError, code="handler_error"):
    """The handler raised. Details: `type` (the exception class name) and `traceback`."""

    @property
    def type(self) -> str:
        return str(self.details.get("type", ""))

    @property
    def traceback(self) -> str:
        return str(self.details.get("traceback", ""))


class BadResult(ActionError, code="bad_result"):
    """The handler returned something that is not JSON-compatible."""


class WorkerLost(ActionError, code="worker_lost"):
    """The worker died while running the action. Details: `pid`, `exit_code` or `signal`."""

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


class ActionTimeout(ActionError, code="timeout"):
    """The action ran past its deadline; its worker was killed and replaced."""


class ActionCancelled(ActionError, code="cancelled"):
    """The submitter cancelled the action."""


class Poisoned(ActionError, code="poisoned"):
    """The action killed `poison_threshold` workers and will not be run again."""


class ShuttingDown(ActionError, code="shutting_down"):
    """The pool is stopping: the action was refused, or still queued at the deadline."""


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


class QueueFull(RequestError, code="queue_full"):
    """The pending queue holds `pool.max_queue` actions already."""


class BadRequest(RequestError, code="bad_request"):
    """The request is malformed: not JSON, a missing field, a wrong type."""


class UnknownOp(RequestError, code="unknown_op"):
    """The request names an operation the server does not have."""


class TooLarge(RequestError, code="too_large"):
    """The request line is longer than `server.max_message_bytes`."""


class Forbidden(RequestError, code="forbidden"):
    """The peer's uid is not allowed to use the socket."""


class Unavailable(RequestError, code="unavailable"):
    """The node cannot reach the shared queue (`[cluster]`, Redis): nothing was accepted,
    unless the details say `in_doubt` (the connection was lost while the submit was sent)."""


# -- the pool itself ---------------------------------------------------------------------------


class PoolError(Qoper8Error):
    """The pool cannot go on."""


class WorkerStartError(PoolError, code="worker_start_failed"):
    """A worker could not start: the handler failed to import or its `setup()` raised."""


class RestartIntensityExceeded(PoolError, code="restart_intensity"):
    """More than `supervisor.max_restarts` crashes within `supervisor.restart_window`."""


class PoolClosed(PoolError, code="pool_closed"):
    """The pool is not running (not started yet, or closed)."""


class ConfigError(Qoper8Error, code="config_error"):
    """A configuration file or value is invalid. Details: `errors`, one line per problem."""


# -- clients -----------------------------------------------------------------------------------


class ConnectError(Qoper8Error):
    """The client cannot talk to a daemon."""


class NotRunning(ConnectError, code="not_running"):
    """No socket at the path, or nobody listening on it."""


class AccessDenied(ConnectError, code="access_denied"):
    """The socket exists but this user may not open it."""


class ConnectTimeout(ConnectError, code="connect_timeout"):
    """The daemon did not answer in time."""


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
