"""Run the benchmarks side by side in one run, each suite in a fresh interpreter, and
write their figures.

    python -m bench                 # every suite
    python -m bench engine          # some suites, by name
    python -m bench --quick engine  # smaller sizes, for a smoke run (to bench/results/quick/)
    python -m bench --report bench/results/2026-11-28.json  # only redo report and chart

Figures go to bench/results/<date>.json (<date>-2.json and on for later runs that day:
suites, the machine, each target with its ratio and whether it was met), then into REPORT.md
and throughput.png beside it. Nothing here runs in the test suite: machines are shared and
noisy, so targets are ratios measured in the same run, never timed assertions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    baselines,
    cluster,
    engine,
    faults,
    memory,
    physical,
    pipelining,
    qoper8_table,
    qoper8d_pools,
    report,
    seed,
    service,
)
from bench._common import RESULTS, ROOT, Figure, error_figure, is_number, machine, say

SUITES: dict[str, Callable[[bool], dict[str, Figure]]] = {
    "physical": lambda quick: physical.run(*((2_000, 500_000) if quick else (20_000, 5_000_000))),
    "baselines": baselines.run,
    "qoper8d_pools": qoper8d_pools.run,
    "engine": lambda quick: engine.run(
        {
            "imap": 5_000,
            "map": 50_000,
            "callers_each": 100,
            "one_shot": 2_000,
            "latency": 2_000,
            "cpu_bound": 300,
            "kills": 5,
        }
        if quick
        else None
    ),
    "service": service.run,
    "pipelining": pipelining.run,
    "qoper8_table": qoper8_table.run,
    "faults": faults.run,
    "seed": seed.run,
    "cluster": cluster.run,
    # In a fresh interpreter of its own, so the suites before it do not skew its RSS.
    "memory": memory.run,
}

# (name, numerator, denominator or None, comparison, bound, what)
TARGETS: list[tuple[str, str, str | None, str, float, str]] = [
    ("map_vs_imap", "map_vs_imap", None, ">=", 15.0,
     "pool.map throughput / imap_unordered(chunksize=1)"),
    ("map_master_cpu", "map_master_cpu", None, "<=", 1.5,
     "master CPU per trivial action in bulk, us"),
    ("map_vs_mp_map", "bulk_map_vs_mp_map", None, ">=", 1.2,
     "pool.map / multiprocessing.Pool.map (default chunks), the same pre-built list"),
    ("callers_vs_imap", "callers_vs_imap", None, ">=", 3.0,
     "256 concurrent callers / imap_unordered(chunksize=1)"),
    ("one_shot_vs_imap", "one_shot_vs_imap", None, ">=", 1.0,
     "20,000 one-shot tasks / imap_unordered(chunksize=1), median of 5 pairs"),
    ("latency_vs_floor", "idle_latency_vs_pingpong", None, "<=", 1.3,
     "idle pool.run p50 / the better of the blocking and polled 2-process floors"),
    ("cpu_bound_busy", "cpu_bound_share_of_available", None, ">=", 95.0,
     "CPU-bound 1 ms actions: core time the machine's other processes left, busy with "
     "handler work, %"),
    ("replacement_ready", "replacement_ready_p50_forkserver", None, "<=", 50.0,
     "a killed worker's replacement ready, p50 ms"),
    ("death_noticed", "death_noticed_p50_forkserver", None, "<=", 10.0,
     "a caller learns of its worker's death, p50 ms"),
    ("socket_map_vs_imap", "socket_map_rate", "mp_imap_unordered_cs1_rate", ">=", 4.0,
     "Client.map over the socket / imap_unordered(chunksize=1)"),
    ("socket_latency_vs_floor", "socket_latency_vs_pingpong", None, "<=", 1.3,
     "idle submit p50 over the socket / the better of the blocking and polled 3-process floors"),
    ("pipelining_default", "pipelining_worst_ratio", None, ">=", 0.9,
     "the clients' default window / the best fixed window, worst of sizes, results, clients"),
    ("cluster_vs_celery", "cluster_map_rate", "celery_group_rate", ">=", 50.0,
     "bulk through two cluster nodes / Celery prefork on the same Redis"),
    ("cluster_latency_vs_raw", "cluster_latency_p50", "cluster_raw_round_trip_p50", "<=", 1.5,
     "cluster submit p50 / raw XADD-XREADGROUP-reply round trip p50"),
    ("cluster_soak_lost", "cluster_soak_lost", None, "<=", 0.0,
     "three nodes, one SIGKILLed every 2 s: submits lost or failed"),
    ("cluster_soak_answered", "cluster_soak_slowest", None, "<=", 6.0,
     "the same: slowest answer, s (2 x claim_idle + 2)"),
    ("master_rss_bounded", "master_rss_growth", None, "<=", 5.0,
     "master RSS growth over 1,000,000 trivial actions through pool.map, %"),
    ("seed_throughput", "seed_vs_ideal", None, ">=", 0.9,
     "256 workers, 10 ms blocking sleep: throughput / 25,600 actions/s"),
    ("seed_worker_uss", "seed_qoper8d_worker_uss", None, "<=", 3.0,
     "an idle worker's USS with the fork server, MiB"),
]  # fmt: skip


def evaluate(figures: dict[str, Figure]) -> list[dict[str, Any]]:
    results = []
    for name, num, den, op, bound, what in TARGETS:
        if num not in figures or (den is not None and den not in figures):
            continue
        value = figures[num]["value"]
        if not is_number(value) or (den is not None and not is_number(figures[den]["value"])):
            continue  # a measurement failed: its error figure says why
        if den is not None:
            value = value / figures[den]["value"]
        met = value >= bound if op == ">=" else value <= bound
        results.append(
            {
                "target": name,
                "what": what,
                "value": round(value, 3),
                "bound": f"{op} {bound}",
                "met": met,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], default=[])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", help="where to write the JSON (default bench/results/<date>)")
    parser.add_argument("--suite-out", help=argparse.SUPPRESS)  # one suite, figures to a file
    parser.add_argument(
        "--report",
        metavar="FILE.json",
        help="run nothing: write REPORT.md and throughput.png from an existing results JSON",
    )
    args = parser.parse_args(argv)
    if args.report:
        write_report(report.load(args.report), args.report)
        return 0
    if args.suite_out:
        (name,) = args.suites
        Path(args.suite_out).write_text(json.dumps(SUITES[name](args.quick)))
        return 0
    names = args.suites or list(SUITES)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "suites": {}}
    results["started"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    figures: dict[str, Figure] = {}
    for name in names:
        say(f"{name}:")
        results["suites"][name] = run_suite(name, args.quick)
        figures.update(results["suites"][name])
    results["targets"] = evaluate(figures)
    results["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    say("targets:")
    for t in results["targets"]:
        mark = "met " if t["met"] else "MISS"
        say(f"  [{mark}] {t['what']}: {t['value']} (target {t['bound']})")
    # A smoke run's figures mean little: they never replace a real run's.
    default_dir = RESULTS / "quick" if args.quick else RESULTS
    out = Path(args.out) if args.out else _free_name(default_dir, datetime.date.today().isoformat())
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    say(f"wrote {out}")
    write_report(results, out)
    return 0


def _free_name(directory: Path, stem: str) -> Path:
    """<stem>.json, or <stem>-2.json and so on: a second run the same day keeps the first."""
    out = directory / f"{stem}.json"
    k = 2
    while out.exists():
        out = directory / f"{stem}-{k}.json"
        k += 1
    return out


def run_suite(name: str, quick: bool) -> dict[str, Figure]:
    """Run one suite in a fresh interpreter of its own: what an earlier suite left behind
    (a large heap for the garbage collector to scan, pages shared with forked children)
    must not skew the next one's figures."""
    with tempfile.TemporaryDirectory(prefix="q8bench-") as tmp:
        out = Path(tmp) / "figures.json"
        argv = [sys.executable, "-m", "bench", name, "--suite-out", str(out)]
        try:
            subprocess.run([*argv, *(["--quick"] if quick else [])], cwd=ROOT, check=True)
            figures: dict[str, Figure] = json.loads(out.read_text())
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            say(f"  {name}: FAILED {exc!r}")
            figures = {f"{name}_error": error_figure(exc, f"the {name} suite's process failed")}
    return figures


def write_report(results: dict[str, Any], source: str | Path) -> None:
    path = Path(source).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    md, png = report.write(results, str(shown), path.parent)
    say(f"wrote {md} and {png}")


if __name__ == "__main__":
    sys.exit(main())
