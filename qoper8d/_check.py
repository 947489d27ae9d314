"""The throwaway worker of `qoper8d --check-config`: `python -m qoper8d._check SPEC_JSON`.

It does what a worker does before it reports ready, and nothing after: import the handler
and every route, notice an async handler written for trio when `pool.async_backend` is
`"asyncio"`, then run each handler module's `setup()` (on the configured event loop when
a handler is async, as a worker does) and, once every setup succeeded, its `teardown()`.
The verdict is the last line on stderr, one problem, starting with the key it is about;
exit 1 for a problem, 0 for none. What the handler prints comes before the verdict.

A process of its own, so that the handler's side effects (threads, sockets, module state)
never touch the caller; `pool.check_handlers` runs it under `pool.start_timeout`.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

import msgspec

from qoper8d import wire
from qoper8d._report import describe
from qoper8d.worker import (
    HandlerLoadError,
    _Handlers,
    _run_async,
    extend_path,
    load_handler,
)

__all__ = ["check", "main"]


def _trio_names(code: types.CodeType, scope: dict[str, Any], trio: Any) -> list[str]:
    """The global names `code` (nested functions included) uses that are trio's."""
    found = []
    for name in code.co_names:
        value = scope.get(name)
        if value is trio or str(getattr(value, "__module__", "")).partition(".")[0] == "trio":
            found.append(name)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _trio_names(const, scope, trio)
    return found


def _written_for_trio(fn: Any) -> bool:
    """Whether an async handler's own code calls trio (anyio code runs on both loops)."""
    trio = sys.modules.get("trio")
    code = getattr(fn, "__code__", None)
    if trio is None or code is None:
        return False
    return bool(_trio_names(code, getattr(fn, "__globals__", {}), trio))


def _wrong_loop(spec: wire.WorkerSpec) -> str | None:
    if spec.async_backend != "asyncio":
        return None
    named = [("pool.handler", spec.handler)]
    named += [(f"pool.routes.{kind}", name) for kind, name in spec.routes.items()]
    for key, name in named:
        fn = load_handler(name)
        if inspect.iscoroutinefunction(fn) and _written_for_trio(fn):
            return (
                f"{key}: {name!r} is an async handler that calls trio, but "
                'pool.async_backend is "asyncio" (set it to "trio", or write it with anyio)'
            )
    return None


def _key(spec: wire.WorkerSpec, module: str) -> str:
    """The configuration key that brought `module` in (the default handler's first)."""
    named = [("pool.handler", spec.handler)]
    named += [(f"pool.routes.{kind}", name) for kind, name in spec.routes.items()]
    return next((key for key, name in named if name.partition(":")[0] == module), "pool.handler")


def _run_hooks(spec: wire.WorkerSpec, handlers: _Handlers, name: str) -> str | None:
    """Run every module's `name()` hook as a worker does; the first failure as one line."""
    hooks = [
        (m.__name__, hook) for m in handlers.modules if callable(hook := getattr(m, name, None))
    ]
    started: list[str] = []  # the modules whose hook was called, the failing one last

    def run_sync() -> None:
        for module, hook in hooks:
            started.append(module)
            hook()

    async def run_async() -> None:
        for module, hook in hooks:
            started.append(module)
            if inspect.isawaitable(done := hook()):
                await done

    try:
        if handlers.is_async:
            _run_async(run_async, spec.async_backend)
        else:
            run_sync()
    except Exception as exc:
        kind, message, _ = describe(exc)
        module = started[-1] if started else "?"
        line = f"{_key(spec, module)}: {module}.{name}() raised {kind}: {message}"
        return line.replace("\n", " ")
    except SystemExit as exc:  # a worker would exit before it could report ready
        module = started[-1] if started else "?"
        return f"{_key(spec, module)}: {module}.{name}() exited (SystemExit {exc.code!r})"
    return None


def check(spec: wire.WorkerSpec) -> str | None:
    """Load the handler(s) the way a worker would, setup included; the problem as one
    line, or None."""
    extend_path(spec.handler_path)
    try:
        handlers = _Handlers(spec)
    except HandlerLoadError as exc:
        return f"pool.handler: {exc}"
    except Exception as exc:
        kind, message, _ = describe(exc)
        return f"pool.handler: handler {spec.handler!r}: importing it raised {kind}: {message}"
    return (
        _wrong_loop(spec)
        or _run_hooks(spec, handlers, "setup")
        or _run_hooks(spec, handlers, "teardown")
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m qoper8d._check SPEC_JSON  (run by --check-config)", file=sys.stderr)
        return 2
    problem = check(msgspec.json.decode(args[0], type=wire.WorkerSpec))
    if problem:
        sys.stdout.flush()
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
