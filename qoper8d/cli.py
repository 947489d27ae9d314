"""The command lines: `qoper8d` (the daemon) and `qoper8ctl` (talks to it).

Both are `main(argv=None) -> int` functions returning an exit code from named constants, so
they can be called from tests and scripts as well as from the console scripts. The daemon's
are here; `qoper8ctl`'s implementation lives in `qoper8d.ctl` and is re-exported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import trio

from qoper8d._fds import ensure_fd_limit, fd_limit_problem
from qoper8d._version import __version__
from qoper8d.config import Config, Overrides, apply_overrides, dump_config, load_config
from qoper8d.ctl import (
    CTL_DEGRADED,
    CTL_FAILED,
    CTL_NOT_RUNNING,
    CTL_OK,
    CTL_UNKNOWN,
    CTL_USAGE,
    ctl_main,
    format_status,
    status_problems,
)
from qoper8d.errors import ConfigError, RestartIntensityExceeded, Unavailable, WorkerStartError

__all__ = [
    "CTL_DEGRADED",
    "CTL_FAILED",
    "CTL_NOT_RUNNING",
    "CTL_OK",
    "CTL_UNKNOWN",
    "CTL_USAGE",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_RESTARTS",
    "EXIT_SOCKET",
    "EXIT_USAGE",
    "EXIT_WORKERS",
    "ctl_main",
    "daemon_main",
    "format_status",
    "status_problems",
]

# -- qoper8d exit codes ------------------------------------------------------------------------
#: Stopped normally (including after SIGTERM/SIGINT, `shutdown` or `drain`).
EXIT_OK = 0
#: Something unexpected; the log says what.
EXIT_FAILED = 1
#: Bad command-line arguments.
EXIT_USAGE = 2
#: The configuration is invalid (`--check-config` exits with this for any problem it finds,
#: a handler's `setup()` that raises included).
EXIT_CONFIG = 3
#: The control socket cannot be used: another daemon has it, or its path is unsafe.
EXIT_SOCKET = 4
#: The workers could not start: the handler does not import, or its setup() fails.
EXIT_WORKERS = 5
#: Workers crashed faster than `supervisor.max_restarts` per `supervisor.restart_window`.
EXIT_RESTARTS = 6
#: `[cluster]`: Redis cannot be reached (or refuses) at start.
EXIT_CLUSTER = 7
#: Interrupted before the daemon was up (Ctrl-C during start-up).
EXIT_INTERRUPTED = 130

# Flags that override one key each; a flag left out changes nothing.
_OVERRIDES: dict[str, tuple[str, str]] = {
    "size": ("pool", "size"),
    "handler": ("pool", "handler"),
    "socket": ("server", "socket"),
    "log_format": ("monitor", "log_format"),
    "log_level": ("monitor", "log_level"),
    "monitor_interval": ("monitor", "interval"),
}


def _daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qoper8d",
        description="Run a pool of persistent worker processes behind a Unix socket.",
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file (default: none)")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, load the handlers and run their setup() in a "
        "throwaway worker, exit",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration, exit"
    )
    parser.add_argument("--size", type=int, help="pool.size")
    parser.add_argument("--handler", help='pool.handler, "module:function"')
    parser.add_argument("--socket", help="server.socket")
    parser.add_argument(
        "--log-format", choices=["auto", "json", "console"], help="monitor.log_format"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="monitor.log_level"
    )
    parser.add_argument("--monitor-interval", type=float, help="monitor.interval, seconds")
    parser.add_argument("--version", action="version", version=f"qoper8d {__version__}")
    return parser


def command_line_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The keys the flags given on the command line set, by section. A relative `--socket`
    is the current directory's, as any path typed on a command line is."""
    overrides: dict[str, dict[str, Any]] = {}
    for name, (section, key) in _OVERRIDES.items():
        value = getattr(args, name, None)
        if value is not None:
            if name == "socket" and value:
                value = os.path.abspath(value)
            overrides.setdefault(section, {})[key] = value
    return overrides


def load_effective_config(path: Path | None, args: argparse.Namespace) -> Config:
    """The file (or the defaults) with the flags given on the command line applied; a
    reload applies the same flags to the file again (`Daemon.overrides`)."""
    config = Config() if path is None else load_config(path)  # the file's own problems first
    source = f"{path or '<defaults>'} + command line"
    return apply_overrides(config, command_line_overrides(args), source)


def daemon_main(argv: list[str] | None = None) -> int:
    """`qoper8d`: run the service in the foreground until stopped."""
    args = _daemon_parser().parse_args(argv)
    try:
        config = load_effective_config(args.config, args)
    except ConfigError as exc:
        for line in exc.details.get("errors", [exc.message]):
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - load_config reports these
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        from qoper8d.pool import check_handlers

        problems = check_handlers(config.pool)
        fd_problem = fd_limit_problem(
            config.pool.size, config.server.max_connections + config.http.connections()
        )
        if fd_problem is not None:
            problems.append(fd_problem)
        for line in problems:
            where = args.config or "<defaults>"
            print(f"{where}: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.config or '<defaults>'}: ok")
        return EXIT_CONFIG if problems else EXIT_OK
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return EXIT_OK
    return _run_daemon(config, args.config, command_line_overrides(args))


def _run_daemon(config: Config, path: Path | None, overrides: Overrides) -> int:
    import structlog  # imported late: --check-config and --print-config are quick

    from qoper8d.control import SocketInUse
    from qoper8d.daemon import Daemon
    from qoper8d.monitor import configure_logging

    # Descriptors for every worker and every client the configuration allows, or no start:
    # running out of them half-way costs connections and workers, at the worst moment.
    try:
        was, soft = ensure_fd_limit(
            config.pool.size, config.server.max_connections + config.http.connections()
        )
    except ConfigError as exc:
        print(f"{path or '<defaults>'}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    logs = configure_logging(config.monitor.log_format, config.monitor.log_level)
    log = structlog.get_logger("qoper8d.daemon")
    if soft != was:
        log.info("daemon.fd_limit_raised", soft=soft, was=was)
    try:
        trio.run(Daemon(config, path, logs, overrides).run)
    except WorkerStartError as exc:
        log.error("daemon.workers_failed", error=exc.message, **exc.details)
        return EXIT_WORKERS
    except SocketInUse as exc:
        log.error("daemon.socket_unusable", error=exc.message)
        return EXIT_SOCKET
    except RestartIntensityExceeded as exc:
        log.critical("daemon.restart_intensity_exceeded", error=exc.message)
        return EXIT_RESTARTS
    except Unavailable as exc:
        log.error("daemon.cluster_unavailable", error=exc.message)
        return EXIT_CLUSTER
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK
