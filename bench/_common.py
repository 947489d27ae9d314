"""What every benchmark shares: timing, percentiles, CPU pinning, the machine's description."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: A figure: a number with its unit, and what it measures.
Figure = dict[str, Any]


def figure(value: float, unit: str, what: str, **extra: Any) -> Figure:
    return {"value": round(value, 4), "unit": unit, "what": what, **extra}


def error_figure(exc: BaseException, what: str) -> Figure:
    """A measurement that failed: the run goes on, and the JSON says why."""
    return {"value": f"{type(exc).__name__}: {exc}", "unit": "error", "what": what}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_kinds(pid: int | str = "self") -> dict[str, int]:
    """A process's memory in bytes, from /proc/<pid>/smaps_rollup: `uss` (pages only it
    maps: what its exit would free), `pss` (its pages, each shared one divided by the
    processes sharing it) and `rss`."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0]) * 1024
    return {
        "uss": fields["Private_Clean"] + fields["Private_Dirty"] + fields["Private_Hugetlb"],
        "pss": fields["Pss"],
        "rss": fields["Rss"],
    }


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


@contextlib.contextmanager
def pinned(cpus: set[int]) -> Iterator[None]:
    """Run the block with this process pinned to `cpus`; restore the old affinity after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM `proc` and wait for it; SIGKILL it if it has not gone after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy() -> float:
    """CPU seconds every process on the machine has used since boot, over all CPUs, stolen
    time included (from /proc/stat): what is left of `wall x cpus` after the others' share
    of it is the time a measured set of processes could have had."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall and this-process CPU time over a block."""

    def __enter__(self) -> Stopwatch:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare figures across runs."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "commit": commit,
        "load_average_before": os.getloadavg(),
    }


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def say_figures(out: dict[str, Figure]) -> None:
    for name, fig in out.items():
        say(f"  {name}: {fig['value']} {fig['unit']}")
