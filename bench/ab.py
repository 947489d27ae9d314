"""Old code against new, alternately: the A/B every performance claim here rests on.

    python -m bench.ab OLD_CHECKOUT NEW_CHECKOUT [--runs 5] [probe ...]

Each probe is a small program run in a fresh interpreter whose working directory (and so
whose `qoper8d`, daemon and workers) is one checkout, then the other, A B A B ..., `--runs`
times each; the figure is the median of each side and the median of the per-pair ratios
(pairing keeps the ratio meaningful while the machine's speed drifts). Probes use only the
public API, so any two commits can be compared: make a checkout with `git worktree add`.

Probes: `map` (in-process `pool.map`, trivial actions, actions/s), `latency` (`pool.run` on
an idle pool, p50 us), `socket_map` (a daemon and `Client.map` with its default window and
with 2048, actions/s), `socket_latency` (one `Client.submit` at a time, p50 us).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

PROBES: dict[str, str] = {
    "map": """
        import time, trio, qoper8d
        async def main():
            async with qoper8d.open_pool("handlers.echo:plus_one", size=2) as pool:
                [r async for r in pool.map({"x": i} for i in range(20_000))]
                best = 0.0
                for _ in range(3):
                    t = time.perf_counter()
                    total = 0
                    async for r in pool.map({"x": i} for i in range(300_000)):
                        total += r
                    best = max(best, 300_000 / (time.perf_counter() - t))
                return {"map": best}
        print(json.dumps(trio.run(main)))
    """,
    "latency": """
        import statistics, time, trio, qoper8d
        async def main():
            async with qoper8d.open_pool("handlers.echo:plus_one", size=2) as pool:
                samples = []
                for i in range(6000):
                    t = time.perf_counter()
                    await pool.run({"x": i})
                    if i >= 1000:
                        samples.append(time.perf_counter() - t)
                return {"latency_p50_us": statistics.median(samples) * 1e6}
        print(json.dumps(trio.run(main)))
    """,
    "socket_map": """
        import time
        from bench.service import daemon
        from qoper8d import Client
        out = {}
        with daemon() as (path, pid), Client(path) as client:
            list(client.map({"x": i} for i in range(5000)))
            for name, kw in (("socket_map_default", {}), ("socket_map_2048", {"window": 2048})):
                best = 0.0
                for _ in range(3):
                    t = time.perf_counter()
                    list(client.map(({"x": i} for i in range(100_000)), **kw))
                    best = max(best, 100_000 / (time.perf_counter() - t))
                out[name] = best
        print(json.dumps(out))
    """,
    "socket_latency": """
        import statistics, time
        from bench.service import daemon
        from qoper8d import Client
        with daemon() as (path, pid), Client(path) as client:
            samples = []
            for i in range(5000):
                t = time.perf_counter()
                client.submit({"x": i})
                if i >= 500:
                    samples.append(time.perf_counter() - t)
        print(json.dumps({"socket_latency_p50_us": statistics.median(samples) * 1e6}))
    """,
}

#: Figures where lower is better (the ratio is still new / old).
LOWER_IS_BETTER = {"latency_p50_us", "socket_latency_p50_us"}


def probe(checkout: Path, name: str) -> dict[str, float]:
    source = "import json\n" + textwrap.dedent(PROBES[name])
    done = subprocess.run(
        [sys.executable, "-c", source],
        cwd=checkout,
        env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} in {checkout} failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compare(old: Path, new: Path, names: list[str], runs: int) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in names:
        pairs: list[tuple[dict[str, float], dict[str, float]]] = []
        for _ in range(runs):
            a = probe(old, name)
            b = probe(new, name)
            pairs.append((a, b))
            print(f"  {name}: old {a}  new {b}", file=sys.stderr, flush=True)
        for key in pairs[0][0]:
            olds = [a[key] for a, _ in pairs]
            news = [b[key] for _, b in pairs]
            table[key] = {
                "old": statistics.median(olds),
                "new": statistics.median(news),
                "ratio": statistics.median(b / a for a, b in zip(olds, news, strict=True)),
                "runs": runs,
            }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("probes", nargs="*", metavar="PROBE", help=", ".join(PROBES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    unknown = set(args.probes) - set(PROBES)
    if unknown:
        parser.error(f"no such probe: {', '.join(sorted(unknown))} (probes: {', '.join(PROBES)})")
    table = compare(args.old.resolve(), args.new.resolve(), args.probes or list(PROBES), args.runs)
    for key, row in table.items():
        better = "lower is better" if key in LOWER_IS_BETTER else "higher is better"
        print(
            f"{key:24} old {row['old']:>12,.1f}  new {row['new']:>12,.1f}  "
            f"new/old {row['ratio']:.3f}  (median of {row['runs']} pairs; {better})"
        )
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
