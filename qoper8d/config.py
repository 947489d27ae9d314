"""Configuration: frozen, strictly validated, one name per concept.

Every key lives here once, with its type, its range and its default; `etc/qoper8.toml`
documents the same keys with comments, and a test keeps the two in step.

Validation is key by key rather than one `msgspec.convert` of the whole document, because
msgspec stops at the first problem and a person fixing a file wants every problem at once.
Each problem is one line naming the file, the dotted key and, in plain words derived from the
key's type and constraints, what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import operator
import os
import re
import tomllib
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args, get_origin, get_type_hints

import msgspec
import tomli_w

from qoper8d.errors import ConfigError

__all__ = [
    "HANDLER_PATTERN",
    "ClusterConfig",
    "Config",
    "HandlerName",
    "HttpConfig",
    "MonitorConfig",
    "Overrides",
    "PoolConfig",
    "ServerConfig",
    "SupervisorConfig",
    "apply_overrides",
    "changes",
    "config_from_mapping",
    "default_socket_path",
    "dump_config",
    "load_config",
]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_HANDLER_RE = rf"^{_DOTTED}:{_DOTTED}$"
HANDLER_PATTERN = re.compile(_HANDLER_RE)

# `extra` carries the wording of error messages: "expected" replaces the words derived from the
# type, "unit" names what a number counts. msgspec itself ignores both.
HandlerName = Annotated[
    str,
    msgspec.Meta(
        pattern=_HANDLER_RE,
        extra={"expected": '"module:function" (e.g. "handlers.echo:handle")'},
    ),
]
Seconds = Annotated[float, msgspec.Meta(ge=0, extra={"unit": "seconds"})]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, extra={"unit": "seconds"})]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    def replace(self, **changes: Any) -> Any:
        """A validated copy with `changes` applied (unknown keys and bad values raise)."""
        return msgspec.convert({**msgspec.structs.asdict(self), **changes}, type(self))


class PoolConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[pool]`: the workers and how work reaches them."""

    size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4  # persistent workers
    handler: HandlerName = "handlers.echo:handle"  # runs an action without a route
    routes: dict[str, HandlerName] = {}  # an action's "type" -> the handler that runs it
    handler_path: list[str] = []  # directories put in front of a worker's sys.path
    async_backend: Literal["trio", "asyncio"] = "trio"  # the loop for async handlers
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    preload: bool = False  # import the handlers in the fork server, before forking
    max_batch_bytes: Annotated[int, msgspec.Meta(ge=64, le=64 << 20)] = 8192
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    # Bound of the pending queue's action bytes (with max_queue: whichever is reached first).
    max_queue_bytes: Annotated[int, msgspec.Meta(ge=1024, extra={"unit": "bytes"})] = 256 << 20
    # The longest result (as JSON) a worker may send back; a longer one ends bad_result.
    max_result_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30, extra={"unit": "bytes"})] = (
        16 << 20
    )
    action_timeout: Seconds = 0.0  # 0: no limit
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1  # runs after worker_lost
    poison_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    start_timeout: PositiveSeconds = 30.0
    grace_period: Seconds = 10.0
    kill_timeout: Seconds = 2.0
    max_actions_per_worker: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no limit
    max_worker_rss_mb: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no limit
    output_rate: Annotated[float, msgspec.Meta(ge=0)] = 1000.0  # log lines/s/stream; 0: all
    idle_spin: Annotated[float, msgspec.Meta(ge=0, le=0.01, extra={"unit": "seconds"})] = 0.0001


class SupervisorConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[supervisor]`: replacing crashed workers, and when to give up."""

    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 10  # crashes allowed per window
    restart_window: PositiveSeconds = 60.0
    backoff_initial: Seconds = 0.1
    backoff_max: Seconds = 10.0
    backoff_reset: Seconds = 30.0  # a worker that ran this long counts as stable


class ServerConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[server]`: the control socket.

    A relative `socket` in a configuration file is resolved against that file's directory
    when it is loaded, so the daemon and `qoper8ctl` agree on the path whatever their cwd.
    """

    socket: str = ""  # empty: default_socket_path()
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576  # one request line
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    read_timeout: PositiveSeconds = 30.0  # for a partial request line to complete
    # Answers waiting for one client to read them before its queued work and reading pause.
    max_unsent_bytes: Annotated[int, msgspec.Meta(ge=65536, extra={"unit": "bytes"})] = 16 << 20
    write_timeout: PositiveSeconds = 60.0  # a client reading nothing this long is disconnected
    allowed_uids: list[Annotated[int, msgspec.Meta(ge=0)]] = []  # besides ours and root
    socket_group: str = ""  # a group given access to the socket's directory and the socket

    def socket_path(self) -> Path:
        """The configured socket path, or the default one when none is configured."""
        return Path(self.socket) if self.socket else default_socket_path()


class MonitorConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[monitor]`: logging and periodic pool snapshots."""

    interval: PositiveSeconds = 30.0  # between pool snapshots
    silent_start: bool = False  # no start-up banner
    # auto: console lines on a tty or with FORCE_COLOR, JSON otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


_LISTEN_RE = r"^$|^(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z.-]+):[0-9]{1,5}$"
_HOST_RE = r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z.-]+)$"
ListenAddress = Annotated[
    str,
    msgspec.Meta(
        pattern=_LISTEN_RE,
        extra={"expected": '"host:port" (e.g. "127.0.0.1:9808", "[::1]:9808"), or "" (off)'},
    ),
]
HostName = Annotated[
    str, msgspec.Meta(pattern=_HOST_RE, extra={"expected": 'a host name (e.g. "q8.example")'})
]


class HttpConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[http]`: the optional read-only listener for operators: metrics, status, a page.

    Every local user can reach a loopback port, so it serves counts and states only, and a
    non-loopback address is refused unless `allow_remote` (checked when the file is read).
    """

    listen: ListenAddress = ""  # "host:port", host an IP address or localhost; "": off
    allow_remote: bool = False  # may `listen` name an address other machines can reach?
    allowed_hosts: list[HostName] = []  # Host header names accepted besides the listener's
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64  # TCP connections at once
    max_clients: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16  # /events streams at once
    push_interval: Annotated[float, msgspec.Meta(ge=0.01, le=3600, extra={"unit": "seconds"})] = (
        1.0  # between snapshots on /events
    )
    # A connection's life without a request in progress (its first one included).
    keep_alive_timeout: PositiveSeconds = 5.0
    # Sent bytes a client leaves unacknowledged this long: the connection is aborted.
    write_timeout: Annotated[float, msgspec.Meta(ge=0.01, le=3600, extra={"unit": "seconds"})] = (
        10.0
    )

    def connections(self) -> int:
        """Descriptors the listener's connections may take (none when it is off)."""
        return self.max_connections if self.listen else 0

    def address(self) -> tuple[str, int] | None:
        """`listen` as (host, port), the host without brackets; None when off."""
        return parse_listen(self.listen) if self.listen else None


def parse_listen(listen: str) -> tuple[str, int]:
    """`"host:port"` -> (host, port); a `ValueError` says what was expected instead."""
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port from 0 to 65535 (0: any free port)")
    bracketed = host.startswith("[")
    host = host.strip("[]")
    if host == "localhost":
        return host, port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("expected an IP address or localhost before the port") from None
    if (address.version == 6) != bracketed:
        raise ValueError("expected an IPv6 address in brackets, an IPv4 one without")
    return host, port


def is_loopback(host: str) -> bool:
    """Does `host` (an IP address or localhost) name this machine only?"""
    if host == "localhost":
        return True
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class ClusterConfig(_Section, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[cluster]`: many nodes sharing one durable queue (a Redis stream), docs/cluster.md."""

    backend: Literal["none", "redis"] = "none"  # "none": this node alone, Redis untouched
    url: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^(redis|rediss)://[^\s]*$|^unix:///[^\s]*$",
            extra={"expected": "a redis://, rediss:// or unix:///path URL"},
        ),
    ] = "redis://127.0.0.1:6379/0"
    stream: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z0-9_.-]{1,64}$",
            extra={"expected": "1 to 64 letters, digits, '_', '.' or '-'"},
        ),
    ] = "qoper8"  # the work stream, and its consumer group's name
    node: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z0-9_.-]{0,64}$",
            extra={"expected": "up to 64 letters, digits, '_', '.' or '-'"},
        ),
    ] = ""  # this node's consumer name; "": hostname-pid
    claim_idle: Annotated[float, msgspec.Meta(ge=0.1, le=86400, extra={"unit": "seconds"})] = 30.0
    max_deliveries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    result_ttl: Annotated[float, msgspec.Meta(ge=1, le=30 * 86400, extra={"unit": "seconds"})] = (
        300.0
    )
    # Most actions a node takes beyond one per worker, so that it is never idle between
    # reads: it prefetches about 20 ms of work at the rate its actions end, up to this.
    prefetch: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 512


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole file: one field per section, each defaulting to its section's defaults."""

    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)


# The sections in file order, from `Config` itself so a new section cannot be forgotten here.
_SECTIONS: dict[str, type[_Section]] = get_type_hints(Config)


def default_socket_path() -> Path:
    """`$XDG_RUNTIME_DIR/qoper8/qoper8.sock`, else `/tmp/qoper8-<uid>/qoper8.sock`.

    Both live in a directory private to the user, so no other user can take the name first.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime, "qoper8", "qoper8.sock")
    return Path(f"/tmp/qoper8-{os.getuid()}", "qoper8.sock")  # noqa: S108  # per-user dir


# -- loading -----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file; every problem is reported at once in a `ConfigError`.

    A relative `server.socket` is taken relative to the file's directory.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        _fail([f"{source}: cannot read the file: {exc.strerror or exc}"])
    except UnicodeDecodeError as exc:
        _fail([f"{source}: invalid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})"])
    except tomllib.TOMLDecodeError as exc:
        _fail([f"{source}: {_where(str(exc))}"])
    return config_from_mapping(data, source, base_dir=Path(source).parent)


def config_from_mapping(
    data: Mapping[str, Any],
    source: str = "<config>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate already-parsed configuration data (missing keys take their defaults).

    `source` names the data in error lines. A relative `server.socket` is resolved against
    `base_dir` (default: the current directory), so the result never depends on a later chdir.
    """
    errors: list[str] = []
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    if not isinstance(data, Mapping):
        _fail([f"{source}: expected a table of sections, got {_show(data)}"])
    for name, table in data.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            errors.append(f"{source}: {_unknown_section(name, table)}")
        elif not isinstance(table, Mapping):
            errors.append(f"{source}: {_toml_key(name)}: expected a table, got {_show(table)}")
        else:
            sections[name] = _check_section(name, cls, table, source, errors)
    _check_http(sections["http"], source, errors)
    _check_cluster(sections, source, errors)
    if errors:
        _fail(errors)
    socket = sections["server"].get("socket")
    if socket:
        base = Path.cwd() if base_dir is None else Path(base_dir)
        sections["server"]["socket"] = os.path.normpath(base / socket)
    built: dict[str, Any] = {name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
    return Config(**built)


def _check_http(values: Mapping[str, Any], source: str, errors: list[str]) -> None:
    """What `http.listen` means beyond its shape: a real address, and loopback unless the
    file says otherwise (the pages are for local operators by default)."""
    listen = values.get("listen")
    if not listen:
        return
    shown = _show(listen)
    missing = [name for name in ("hypercorn", "prometheus_client") if not find_spec(name)]
    if missing:
        errors.append(
            f"{source}: http.listen: needs the http extra ({', '.join(missing)} missing): "
            "pip install 'qoper8d[http]'"
        )
    try:
        host, _ = parse_listen(listen)
    except ValueError as exc:
        errors.append(f"{source}: http.listen: {exc}, got {shown}")
        return
    if not is_loopback(host) and not values.get("allow_remote", False):
        errors.append(
            f"{source}: http.listen: {shown} is not a loopback address; set "
            "http.allow_remote = true to serve other machines too"
        )


#: The longest action or result a cluster node may be configured to carry: each travels in
#: one Redis argument, which Redis refuses past its `proto-max-bulk-len` (512 MB by
#: default); half that leaves room for the entry's other fields and the reply's envelope.
CLUSTER_MAX_BYTES = 256 << 20


def _check_cluster(sections: Mapping[str, Any], source: str, errors: list[str]) -> None:
    """With `backend = "redis"`, no action or result may be longer than Redis takes: one
    that was could never be added or answered (see `CLUSTER_MAX_BYTES`)."""
    if sections["cluster"].get("backend") != "redis":
        return
    for section, key in (("server", "max_message_bytes"), ("pool", "max_result_bytes")):
        value = sections[section].get(key)
        if value is not None and value > CLUSTER_MAX_BYTES:
            errors.append(
                f"{source}: {section}.{key}: at most {CLUSTER_MAX_BYTES} with "
                f'cluster.backend = "redis" (one Redis argument each), got {value}'
            )


def _fail(errors: list[str]) -> NoReturn:
    raise ConfigError("\n".join(errors), errors=errors)


def _where(message: str) -> str:
    # tomllib (before 3.14) puts the position only in its message: "Invalid value (at line
    # 3, column 7)" or "... (at end of document)".
    match = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", message)
    if match is None:
        return f"invalid TOML: {message}"
    return f"{match[2]}: invalid TOML: {match[1]}"


def _unknown_section(name: str, value: Any) -> str:
    sections = ", ".join(_SECTIONS)
    shown = _toml_key(name)  # a name may hold a newline: the error stays one line
    if isinstance(value, Mapping):
        return f"{shown}: unknown section (sections: {sections})"
    # A key written above the first [section] header lands at the top level.
    owners = [f"{s}.{name}" for s, cls in _SECTIONS.items() if name in cls.__struct_fields__]
    hint = f"did you mean {owners[0]}?" if owners else f"sections: {sections}"
    return f"{shown}: unknown key outside any section ({hint})"


def _check_section(
    section: str, cls: type[_Section], table: Mapping[str, Any], source: str, errors: list[str]
) -> dict[str, Any]:
    hints = _field_types(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{section}.{_toml_key(key)}"
        if key not in hints:
            errors.append(f"{source}: {dotted}: unknown key{_suggest(section, key, hints)}")
            continue
        problems = _check_value(value, hints[key], dotted)
        if problems:
            errors.extend(f"{source}: {line}" for line in problems)
        else:
            values[key] = msgspec.convert(value, hints[key])
    return values


def _field_types(cls: type[_Section]) -> dict[str, Any]:
    # include_extras keeps Annotated: its msgspec.Meta holds the constraints and the wording.
    hints = get_type_hints(cls, include_extras=True)
    return {name: hints[name] for name in cls.__struct_fields__}


def _suggest(section: str, key: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f" (did you mean {section}.{close[0]}?)"
    for other, cls in _SECTIONS.items():
        if key in cls.__struct_fields__:
            return f" (did you mean {other}.{key}?)"
    return ""


def _check_value(value: Any, tp: Any, key: str) -> list[str]:
    """One line per problem with `value` as a `tp`, naming elements of arrays and tables."""
    base = _unwrap(tp)[0]
    origin = get_origin(base)
    if origin is list and isinstance(value, list):
        (item,) = get_args(base)
        return [p for i, v in enumerate(value) for p in _check_value(v, item, f"{key}[{i}]")]
    if origin is dict and isinstance(value, Mapping):
        _, item = get_args(base)
        return [p for k, v in value.items() for p in _check_value(v, item, f"{key}.{_toml_key(k)}")]
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return [f"{key}: expected {_expected(tp, value)}, got {_show(value)}"]
    return []


# -- wording -----------------------------------------------------------------------------------

_BOUNDS = (
    ("ge", ">=", operator.ge),
    ("gt", ">", operator.gt),
    ("le", "<=", operator.le),
    ("lt", "<", operator.lt),
)


def _unwrap(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    if get_origin(tp) is Annotated:
        base, *extras = get_args(tp)
        return base, [m for m in extras if isinstance(m, msgspec.Meta)]
    return tp, []


def _expected(tp: Any, value: Any = None) -> str:
    """What a `tp` looks like, in words; for a number out of range, only the bound it broke."""
    base, metas = _unwrap(tp)
    extra: dict[str, Any] = {k: v for m in metas for k, v in (m.extra or {}).items()}
    if "expected" in extra:
        return str(extra["expected"])
    origin = get_origin(base)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(base))
    if origin is list:
        return f"an array (each {_expected(get_args(base)[0])})"
    if origin is dict:
        return f"a table (each value {_expected(get_args(base)[1])})"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    text = words.get(base, getattr(base, "__name__", str(base)))
    if "unit" in extra:
        text += f" of {extra['unit']}"
    if base is str:
        text += "".join(f" matching {m.pattern}" for m in metas if m.pattern)
    bounds = [
        (name, sym, holds, b)
        for m in metas
        for name, sym, holds in _BOUNDS
        if (b := getattr(m, name)) is not None
    ]
    if bounds and _fits(value, base):
        bounds = [x for x in bounds if not x[2](value, x[3])] or bounds
    if [x[0] for x in bounds] == ["ge", "le"]:
        return f"{text} from {bounds[0][3]} to {bounds[1][3]}"
    return " ".join([text, " and ".join(f"{sym} {b}" for _, sym, _, b in bounds)]).rstrip()


def _fits(value: Any, base: Any) -> bool:
    try:
        msgspec.convert(value, base)
    except msgspec.ValidationError:
        return False
    return True


def _show(value: Any) -> str:
    """A value as it would appear in TOML, shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return repr(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


#: Keys set on the command line, by section: `{"pool": {"size": 2}}`.
Overrides = Mapping[str, Mapping[str, Any]]


def apply_overrides(config: Config, overrides: Overrides, source: str) -> Config:
    """`config` with `overrides` applied, validated as a file is (`source` names it in error
    lines). A relative `server.socket` among them is taken relative to the current
    directory; the file's own was resolved when it was loaded."""
    if not any(overrides.values()):
        return config
    data = msgspec.to_builtins(config)
    for section, keys in overrides.items():
        data.setdefault(section, {}).update(keys)
    if not data["server"].get("socket"):
        data["server"].pop("socket", None)  # the default path, looked up when it is used
    return config_from_mapping(data, source)


# -- output and checks -------------------------------------------------------------------------


def changes(old: msgspec.Struct, new: msgspec.Struct, section: str) -> list[str]:
    """Every key of a section whose value differs, as `section.key: old -> new`."""
    before = msgspec.to_builtins(old)
    return [
        f"{section}.{key}: {before[key]!r} -> {value!r}"
        for key, value in msgspec.to_builtins(new).items()
        if before[key] != value
    ]


def dump_config(config: Config) -> str:
    """The effective configuration as TOML, with `server.socket` written as the path in use.

    Loading the output gives back `config` (with its socket resolved).
    """
    data = msgspec.to_builtins(config)
    data["server"]["socket"] = str(config.server.socket_path())
    return tomli_w.dumps({name: data[name] for name in _SECTIONS})
