"""Configuration: frozen, strictly validated, one name per concept.

Every key lives here once, with its type, its range and its default; `etc/qoper8.toml`
documents the same keys with comments, and a test keeps the two in step.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["PoolConfig", "SupervisorConfig"]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_HANDLER_RE = rf"^{_DOTTED}:{_DOTTED}$"
HANDLER_PATTERN = re.compile(_HANDLER_RE)

HandlerName = Annotated[str, msgspec.Meta(pattern=_HANDLER_RE)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    def replace(self, **changes: Any) -> Any:
        """A validated copy with `changes` applied (unknown keys and bad values raise)."""
        return msgspec.convert({**msgspec.structs.asdict(self), **changes}, type(self))


class PoolConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[pool]`: the workers and how work reaches them."""

    size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    handler: HandlerName = "handlers.echo:handle"
    routes: dict[str, HandlerName] = {}
    handler_path: list[str] = []
    async_backend: Literal["trio", "asyncio"] = "trio"
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    preload: bool = False
    max_batch_bytes: Annotated[int, msgspec.Meta(ge=64, le=64 << 20)] = 8192
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    action_timeout: Seconds = 0.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    poison_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    start_timeout: PositiveSeconds = 30.0
    grace_period: Seconds = 10.0
    kill_timeout: Seconds = 2.0
    max_actions_per_worker: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_worker_rss_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    output_rate: Annotated[float, msgspec.Meta(ge=0)] = 1000.0
    idle_spin: Annotated[float, msgspec.Meta(ge=0, le=0.01)] = 0.0001


class SupervisorConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[supervisor]`: replacing crashed workers, and when to give up."""

    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 10
    restart_window: PositiveSeconds = 60.0
    backoff_initial: Seconds = 0.1
    backoff_max: Seconds = 10.0
    backoff_reset: Seconds = 30.0
