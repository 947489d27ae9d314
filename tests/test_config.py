"""Configuration: the shipped file, strict validation with every problem at once, and dumps."""

from __future__ import annotations

import itertools
import os
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from qoper8d.config import (
    Config,
    MonitorConfig,
    PoolConfig,
    ServerConfig,
    SupervisorConfig,
    config_from_mapping,
    default_socket_path,
    dump_config,
    load_config,
)
from qoper8d.errors import ConfigError
from qoper8d.pool import check_handlers

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "qoper8.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qoper8.toml"
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    errors: list[str] = caught.value.details["errors"]
    assert caught.value.message == "\n".join(errors)
    return errors


# -- the shipped file ---------------------------------------------------------------------------


def test_shipped_file_loads_to_the_defaults() -> None:
    assert load_config(SHIPPED) == Config()


def test_shipped_file_sets_every_key_of_every_section() -> None:
    # Every field present with its default: the file and the code cannot drift apart.
    data = tomllib.loads(SHIPPED.read_text())
    assert list(data) == list(Config.__struct_fields__)
    defaults = msgspec.to_builtins(Config())
    for section in Config.__struct_fields__:
        assert data[section] == defaults[section], section


def test_shipped_file_has_a_comment_above_every_key() -> None:
    lines = SHIPPED.read_text().splitlines()
    for above, line in itertools.pairwise(lines):
        if " = " in line and not line.startswith("#"):
            assert above.startswith("#"), f"no comment above {line!r}"


# -- errors ------------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[pool]\nsise = 4\nmax_queue = "many"\nhandler = "nope"\n',
    )
    assert errors_of(path) == [
        f"{path}: pool.sise: unknown key (did you mean pool.size?)",
        f'{path}: pool.max_queue: expected an integer >= 1, got "many"',
        f'{path}: pool.handler: expected "module:function" (e.g. "handlers.echo:handle"), '
        'got "nope"',
    ]


def test_out_of_range_names_the_bound(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 0\n[monitor]\ninterval = 0\n")
    assert errors_of(path) == [
        f"{path}: pool.size: expected an integer >= 1, got 0",
        f"{path}: monitor.interval: expected a number of seconds > 0, got 0",
    ]


def test_unknown_key_without_a_close_match_has_no_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nzzz = 1\n")
    assert errors_of(path) == [f"{path}: pool.zzz: unknown key"]


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[widgets]\ncount = 1\n")
    assert errors_of(path) == [
        f"{path}: widgets: unknown section "
        "(sections: pool, supervisor, server, monitor, http, cluster)"
    ]


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = 4\nhandler = \n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}: line 3, column 11: invalid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert errors_of(path) == [f"{path}: cannot read the file: No such file or directory"]


def test_booleans_are_not_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nsize = true\n[supervisor]\nbackoff_max = false\n")
    assert errors_of(path) == [
        f"{path}: pool.size: expected an integer from 1 to 1024, got true",
        f"{path}: supervisor.backoff_max: expected a number of seconds >= 0, got false",
    ]


def test_strings_are_not_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, '[monitor]\ninterval = "fast"\n')
    assert errors_of(path) == [
        f'{path}: monitor.interval: expected a number of seconds > 0, got "fast"'
    ]


def test_elements_of_arrays_and_tables_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nallowed_uids = [1000, -1]\n[pool.routes]\nresize = "bad"\n')
    assert errors_of(path) == [
        f"{path}: server.allowed_uids[1]: expected an integer >= 0, got -1",
        f'{path}: pool.routes.resize: expected "module:function" '
        '(e.g. "handlers.echo:handle"), got "bad"',
    ]


def test_no_msgspec_paths_leak(tmp_path: Path) -> None:
    path = write(tmp_path, '[pool]\nsize = "x"\nstart_method = "fork"\n[server]\nsocket = 3\n')
    assert not any("$" in line for line in errors_of(path))


# -- values ------------------------------------------------------------------------------------


def test_integers_are_accepted_as_seconds(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[monitor]\ninterval = 5\n[pool]\ngrace_period = 0\n"))
    assert config.monitor.interval == 5.0
    assert isinstance(config.monitor.interval, float)
    assert config.pool.grace_period == 0.0


def test_missing_keys_take_their_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[pool]\nsize = 2\n"))
    assert config == Config(pool=PoolConfig(size=2))


def test_config_from_mapping_names_its_source() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"pool": {"size": -1}}, source="--size")
    assert caught.value.details["errors"] == ["--size: pool.size: expected an integer >= 1, got -1"]


def test_sections_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().pool.size = 3  # type: ignore[misc]


def test_replace_gives_a_validated_copy() -> None:
    assert PoolConfig().replace(size=2).size == 2
    with pytest.raises(msgspec.ValidationError):
        PoolConfig().replace(size=0)


# -- the socket path ---------------------------------------------------------------------------


def test_default_socket_path_under_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path() == Path("/run/user/1000/qoper8/qoper8.sock")
    assert ServerConfig().socket_path() == default_socket_path()


@pytest.mark.parametrize("value", [None, ""])
def test_default_socket_path_without_xdg_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", value)
    assert default_socket_path() == Path(f"/tmp/qoper8-{os.getuid()}/qoper8.sock")


def test_relative_socket_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "q.toml"
    path.write_text('[server]\nsocket = "../run/q.sock"\n')
    monkeypatch.chdir(ROOT)
    config = load_config(path)
    assert config.server.socket_path() == tmp_path / "run" / "q.sock"


def test_absolute_socket_is_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[server]\nsocket = "/tmp/x/q.sock"\n'))
    assert config.server.socket == "/tmp/x/q.sock"


# -- dumping -----------------------------------------------------------------------------------


def test_dump_round_trips() -> None:
    config = Config(
        pool=PoolConfig(size=2, routes={"resize": "handlers.echo:plus_one"}, handler_path=["lib"]),
        supervisor=SupervisorConfig(max_restarts=3, backoff_initial=0.5),
        server=ServerConfig(allowed_uids=[1000, 1001], read_timeout=2.5),
        monitor=MonitorConfig(interval=1.0, log_format="json", silent_start=True),
    )
    text = dump_config(config)
    resolved = msgspec.structs.replace(
        config, server=config.server.replace(socket=str(default_socket_path()))
    )
    assert config_from_mapping(tomllib.loads(text)) == resolved
    assert list(tomllib.loads(text)) == [
        "pool",
        "supervisor",
        "server",
        "monitor",
        "http",
        "cluster",
    ]


def test_dump_of_the_defaults_loads_again(tmp_path: Path) -> None:
    path = write(tmp_path, dump_config(Config()))
    assert load_config(path).server.socket == str(default_socket_path())


# -- handler checks (a real subprocess each) ---------------------------------------------------


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check imports handlers the way a worker started from the repository would.
    monkeypatch.chdir(ROOT)


def with_handler_pool(handler: str, routes: dict[str, str] | None = None) -> PoolConfig:
    return PoolConfig(handler=handler, routes=routes or {})


@pytest.mark.usefixtures("in_root")
def test_check_handlers_passes_for_a_good_handler() -> None:
    assert (
        check_handlers(with_handler_pool("handlers.echo:handle", {"x": "handlers.echo:plus_one"}))
        == []
    )


@pytest.mark.usefixtures("in_root")
def test_check_handlers_finds_a_missing_module() -> None:
    (line,) = check_handlers(with_handler_pool("handlers.nonexistent:handle"))
    assert line.startswith("pool.handler: handler 'handlers.nonexistent:handle': no module named")


@pytest.mark.usefixtures("in_root")
def test_check_handlers_finds_a_missing_attribute() -> None:
    (line,) = check_handlers(with_handler_pool("handlers.echo:nope"))
    assert line == (
        "pool.handler: handler 'handlers.echo:nope': module 'handlers.echo' has no attribute 'nope'"
    )


@pytest.mark.usefixtures("in_root")
def test_check_handlers_checks_routes_too() -> None:
    (line,) = check_handlers(with_handler_pool("handlers.echo:handle", {"x": "handlers.echo:gone"}))
    assert "handlers.echo:gone" in line


@pytest.mark.usefixtures("in_root")
def test_check_handlers_imports_nothing_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "handlers.imported", raising=False)
    assert check_handlers(with_handler_pool("handlers.imported:handle")) == []
    assert "handlers.imported" not in sys.modules
