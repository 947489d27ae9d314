"""`qoper8ctl`: one command to a running qoper8d, and an exit code that says how it went.

`ctl_main(argv=None) -> int` is the console script's entry point (also reachable as
`qoper8d.cli.ctl_main`). It speaks to the daemon through the public API of the blocking
`qoper8d.Client`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from qoper8d._submit import submit_stream
from qoper8d._version import __version__
from qoper8d.errors import ConfigError

if TYPE_CHECKING:
    from qoper8d.client import Client


__all__ = [
    "CTL_DEGRADED",
    "CTL_FAILED",
    "CTL_INTERRUPTED",
    "CTL_NOT_RUNNING",
    "CTL_OK",
    "CTL_UNKNOWN",
    "CTL_USAGE",
    "ctl_main",
    "format_status",
    "status_problems",
]


# -- qoper8ctl ---------------------------------------------------------------------------------
# Exit codes follow the LSB's `status` convention, so scripts and service managers can tell a
# stopped daemon (3) from one they could not ask (4).

#: status: running, every slot has a live worker. Other commands: done.
CTL_OK = 0
#: status: running, but degraded (a slot without a live worker, a restart in progress, draining).
CTL_DEGRADED = 1
#: Other commands: the daemon refused the request, or an action ended with an error.
CTL_FAILED = 1
#: Bad arguments, an unreadable --config file, or an invalid action on stdin.
CTL_USAGE = 2
#: No daemon: no socket at the path, or nothing listening on it (or it went away mid-request).
CTL_NOT_RUNNING = 3
#: Unknown: permission denied, timed out, or the daemon's answers made no sense.
CTL_UNKNOWN = 4
#: Interrupted (Ctrl-C).
CTL_INTERRUPTED = 130


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def _ctl_parser() -> argparse.ArgumentParser:
    # The connection options are accepted before and after the command; SUPPRESS keeps a
    # subcommand's parser from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("finding the daemon")
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the daemon's TOML configuration; its server.socket is used",
    )
    where.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the control socket (wins over --config; default: the default path)",
    )
    where.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="seconds to wait for the daemon when connecting and for its quick answers "
        "(default: 10; 0: no limit)",
    )
    parser = argparse.ArgumentParser(
        prog="qoper8ctl", description="Talk to a running qoper8d.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"qoper8ctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser(
        "status",
        parents=[common],
        help="show the pool and its workers; exit 0 healthy, 1 degraded, 3 not running, 4 unknown",
    )
    status.add_argument("--json", action="store_true", help="print the daemon's snapshot")
    status.set_defaults(run=_ctl_status)

    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="run one action, or NDJSON actions from stdin (results as NDJSON, in order)",
    )
    submit.add_argument("action", nargs="?", metavar="ACTION_JSON", help="one action as JSON")
    submit.add_argument(
        "--action-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="how long each action may run (default: pool.action_timeout; 0: no limit)",
    )
    submit.add_argument(
        "--max-attempts", type=int, metavar="N", help="runs allowed per action (pool.max_attempts)"
    )
    submit.add_argument(
        "--window",
        type=_positive,
        metavar="N",
        help="actions in flight at once (default: the client's, which adapts; stdin a "
        "terminal: 1, so each result shows before the next line is typed)",
    )
    submit.add_argument(
        "--total",
        type=_count,
        metavar="N",
        help="how many actions stdin holds, for the progress bar (default: a regular file's "
        "lines are counted; a pipe's are unknown)",
    )
    submit.add_argument(
        "--keep-going",
        action="store_true",
        help="on a malformed line: report it, print an error line in its place, carry on "
        "(exit 2 at the end)",
    )
    submit.add_argument(
        "--progress",
        action="store_true",
        help="print the handler's progress reports on stderr, one JSON value a line "
        "(with ACTION_JSON only)",
    )
    submit.set_defaults(run=_ctl_submit)

    scale = commands.add_parser("scale", parents=[common], help="change the number of workers")
    scale.add_argument("size", type=int, metavar="N")
    scale.set_defaults(run=_ctl_scale)

    reload = commands.add_parser(
        "reload", parents=[common], help="re-read the configuration file; print what changed"
    )
    reload.set_defaults(run=_ctl_reload)

    drain = commands.add_parser(
        "drain", parents=[common], help="finish every accepted action, then stop the daemon"
    )
    drain.set_defaults(run=_ctl_drain)

    stop = commands.add_parser("stop", parents=[common], help="stop the daemon gracefully")
    stop.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="time running actions get to finish (default: pool.grace_period)",
    )
    stop.set_defaults(run=_ctl_stop)
    return parser


def ctl_main(argv: list[str] | None = None) -> int:
    """`qoper8ctl`: one command to a running daemon; the exit code says how it went."""
    try:
        args = _ctl_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else CTL_USAGE

    # Imported here: the daemon's own start-up never pays for the client (and anyio).
    from qoper8d.client import Client, resolve_socket_path
    from qoper8d.errors import ConnectError, Forbidden, NotRunning, Qoper8Error

    if args.command == "submit" and args.progress and args.action is None:
        _complain("--progress needs ACTION_JSON (actions from stdin report no progress)")
        return CTL_USAGE
    if args.command == "submit" and args.action is not None:
        # A usage error is reported as one, whether or not a daemon is there to ask.
        try:
            args.action = msgspec.json.decode(args.action)
        except msgspec.DecodeError as exc:
            _complain(f"invalid ACTION_JSON: {exc}")
            return CTL_USAGE
    try:
        path = resolve_socket_path(getattr(args, "socket", None), getattr(args, "config", None))
    except ConfigError as exc:
        for line in exc.details.get("errors", [exc.message]):
            _complain(line)
        return CTL_USAGE
    timeout = getattr(args, "timeout", 10.0) or None
    try:
        with Client(path, timeout=timeout) as client:
            code: int = args.run(client, args)
            return code
    except NotRunning as exc:
        _complain(exc.message)
        return CTL_NOT_RUNNING
    except Forbidden as exc:
        _complain(f"permission denied: {path} ({exc.message})")
        return CTL_UNKNOWN
    except ConnectError as exc:  # AccessDenied, ConnectTimeout, unreadable answers
        _complain(exc.message)
        return CTL_UNKNOWN
    except Qoper8Error as exc:
        _complain(f"{args.command} failed: {exc.code}: {_one_line(exc.message)}")
        # A status that could not be had (too_many_connections, say) is unknown, not degraded.
        return CTL_UNKNOWN if args.command == "status" else CTL_FAILED
    except KeyboardInterrupt:
        return CTL_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output stopped (`| head`): stop too, without a traceback, and
        # without another one when the interpreter flushes stdout on its way out.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CTL_FAILED


def _complain(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return "; ".join(line for line in text.splitlines() if line.strip())


# -- status ------------------------------------------------------------------------------------


def _ctl_status(client: Client, args: argparse.Namespace) -> int:
    snapshot = client.status()
    if args.json:
        sys.stdout.write(msgspec.json.encode(snapshot).decode() + "\n")
    else:
        sys.stdout.write(format_status(snapshot))
    sys.stdout.flush()
    problems = status_problems(snapshot)
    if problems:
        _complain(f"degraded: {', '.join(problems)}")
        return CTL_DEGRADED
    return CTL_OK


def status_problems(snapshot: dict[str, Any]) -> list[str]:
    """Why a snapshot is not healthy, one phrase per problem; empty when it is healthy."""
    problems = []
    if snapshot.get("state") != "running":
        problems.append(f"the pool is {snapshot.get('state')}")
    problems.extend(
        f"slot {w.get('slot')} is {w.get('state')}"
        for w in snapshot.get("workers", [])
        if w.get("pid") is None or w.get("state") not in ("idle", "busy")
    )
    if snapshot.get("cluster", {}).get("connected") is False:
        problems.append("the cluster node has lost Redis")
    return problems


def format_status(snapshot: dict[str, Any]) -> str:
    """The snapshot for people: one header line, then a row per worker slot (`--json` has
    everything else: outcome counts, actions in flight, the daemon's pid and socket)."""
    s = snapshot
    lines = [
        f"{s.get('state')}: {s.get('size')} workers ({s.get('busy')} busy, {s.get('idle')} "
        f"idle), {s.get('queued')} queued, {s.get('restarts')} restarts, "
        f"up {_duration(s.get('uptime'))}"
    ]
    cluster = s.get("cluster") or {}
    if cluster.get("backend") == "redis":
        lines.append(
            f"cluster: node {cluster.get('node')}, "
            f"{'connected' if cluster.get('connected') else 'NOT CONNECTED'} to "
            f"{cluster.get('url')}, {len(cluster.get('nodes') or [])} nodes live, "
            f"{cluster.get('waiting')} waiting, {cluster.get('pending')} taken, "
            f"{cluster.get('dead')} dead"
        )
    header = ("slot", "pid", "state", "actions", "restarts", "uptime", "rss")
    rows = [header]
    for w in s.get("workers", []):
        state = str(w.get("state"))
        if w.get("running_for") is not None:
            state += f" {_duration(w['running_for'])}"  # a hung handler shows here
        rss = w.get("rss_bytes")
        live = w.get("pid") is not None
        rows.append(
            (
                str(w.get("slot")),
                str(w["pid"]) if live else "-",
                state,
                str(w.get("actions_done")),
                str(w.get("restarts")),
                _duration(w.get("uptime")) if live else "-",
                "-" if rss is None else f"{rss / (1 << 20):.1f} MiB",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {1, 2}  # pid and state read better left-aligned; numbers right-aligned
    for row in rows:
        cells = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _duration(seconds: Any) -> str:
    """12.3s, 5m07s, 2h03m, 3d04h: short, and exact enough for a status line."""
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


# -- submit ------------------------------------------------------------------------------------


def _ctl_submit(client: Client, args: argparse.Namespace) -> int:
    from qoper8d.errors import ActionError, RequestError

    if args.action is None:
        return submit_stream(client, args)
    try:
        result = client.submit(
            args.action,
            timeout=args.action_timeout,
            max_attempts=args.max_attempts,
            on_progress=_print_progress if args.progress else None,
        )
    except (ActionError, RequestError) as exc:
        sys.stdout.write(msgspec.json.encode({"error": exc.to_wire()}).decode() + "\n")
        sys.stdout.flush()
        _complain(f"action failed: {exc.code}: {_one_line(exc.message)}")
        return CTL_FAILED
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()
    return CTL_OK


def _print_progress(value: Any) -> None:
    _complain(f"progress: {msgspec.json.encode(value).decode()}")


# -- the rest ----------------------------------------------------------------------------------


def _ctl_scale(client: Client, args: argparse.Namespace) -> int:
    reached = client.scale(args.size)
    if reached.get("superseded"):
        print(f"superseded by a later resize: the pool has {reached.get('size')} workers")
    else:
        print(f"scaled to {reached.get('size')} workers")
    return CTL_OK


def _ctl_reload(client: Client, args: argparse.Namespace) -> int:
    changed = client.reload()
    for line in changed:
        print(line)
    if not changed:
        print("reloaded: nothing changed")
    return CTL_OK


def _ctl_drain(client: Client, args: argparse.Namespace) -> int:
    client.drain()
    print("drained: every accepted action has ended; the daemon is stopping")
    return CTL_OK


def _ctl_stop(client: Client, args: argparse.Namespace) -> int:
    client.shutdown(args.grace)
    grace = "" if args.grace is None else f" (grace {args.grace:g} s)"
    print(f"stopping{grace}")
    return CTL_OK
