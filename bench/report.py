"""The results JSON as a Markdown report and a chart, for people.

    python -m bench --report bench/results/2026-11-28.json

writes bench/results/REPORT.md (the machine, the targets, Q-Oper8's published figures beside
ours, the pools side by side, every figure by suite) and bench/results/throughput.png (the
throughput of every pool measured, qoper8d highlighted; and Q-Oper8's table, ours against its
published points). `python -m bench` writes both after every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench._common import RESULTS, Figure, is_number

#: Figures of these suites are not pools' throughput of the trivial action: they go to a
#: panel of their own or nowhere.
_NOT_IN_BARS = ("qoper8_table", "memory", "seed")
#: Who is measured, by a figure's name where it does not say itself (`who` in the figure):
#: the peers' prefixes; every other figure outside physical and baselines is ours.
_PEER_PREFIXES = ("mp_", "ppe_", "pebble_", "trio_parallel_", "imap_beside", "qoper8_published")
#: Colour families: ours orange, peers purple, physical bounds grey; a shade per suite.
PALETTE = {
    "ours": ("#d95f02", "#e6550d", "#fd8d3c", "#a63603", "#f16913"),
    "peer": ("#7570b3", "#9e9ac8", "#54278f", "#807dba"),
    "bound": ("#999999", "#bbbbbb"),
}
WHO_NAMES = {"ours": "qoper8d (ours)", "peer": "other pools (peers)", "bound": "physical bound"}
#: What each suite is, in a line.
SUITE_TITLES = {
    "physical": "physical limits: raw ping-pongs and a batched msgpack stream",
    "baselines": "Python's pools, 2 workers, trivial action",
    "qoper8d_pools": "qoper8d in the baselines' shape",
    "engine": "the qoper8d engine in-process",
    "qoper8_table": "Q-Oper8's benchmark table, reproduced",
    "faults": "throughput while workers are SIGKILLed",
    "memory": "worker and master memory",
    "service": "qoper8d as a daemon, over its Unix socket",
    "seed": "the seed's workload: 256 workers, a 10 ms blocking sleep each",
}
#: Pool families with start-up and latency figures, in table order: (prefix, label).
FAMILIES = (
    ("mp_pool", "multiprocessing.Pool (fork)"),
    ("ppe", "ProcessPoolExecutor (fork)"),
    ("trio_parallel", "trio-parallel (spawn)"),
    ("pebble", "pebble.ProcessPool (fork)"),
    ("qoper8d", "qoper8d (forkserver)"),
)


def who(suite: str, name: str, fig: Figure) -> str:
    """ "ours", "peer" or "bound": who a figure measures (its colour family in the chart)."""
    said = fig.get("who")
    if said in PALETTE:
        return str(said)
    if suite == "physical":
        return "bound"
    if suite == "baselines" or name.startswith(_PEER_PREFIXES):
        return "peer"
    return "ours"


def fmt(value: Any) -> str:
    if not is_number(value):
        return f"`{value}`"
    v = float(value)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _all_figures(report: dict[str, Any]) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    for suite in report.get("suites", {}).values():
        figures.update(suite)
    return figures


def _value(figures: dict[str, Figure], name: str) -> str:
    fig = figures.get(name)
    if fig is None:
        return "—"
    return fmt(fig["value"])


# -- Markdown ----------------------------------------------------------------------------------


def markdown(report: dict[str, Any], source: str, chart: str | None) -> str:
    figures = _all_figures(report)
    m = report.get("machine", {})
    when = report.get("finished", "")
    lines = [f"# qoper8d benchmarks, {when[:10]}", ""]
    lines += [
        f"Generated from `{source}`; `python -m bench --report {source}` regenerates it."
        + (
            " **A quick run: small sizes, a smoke test, not figures to quote.**"
            if report.get("quick")
            else ""
        ),
        "Figures are compared as ratios measured side by side in this one run; the machine is"
        " shared and noisy, so absolute figures vary from run to run.",
        "",
        "## The machine",
        "",
    ]
    lines += _table(
        ["", ""],
        [
            ["CPUs (usable)", f"{m.get('cpus')} ({m.get('usable_cpus')})"],
            ["CPU model", str(m.get("cpu_model", ""))],
            ["Python", f"{m.get('implementation', '')} {m.get('python', '')}"],
            ["kernel", str(m.get("kernel", ""))],
            ["commit", f"`{m.get('commit', '')}`"],
            [
                "load average before",
                ", ".join(f"{x:.2f}" for x in m.get("load_average_before", [])),
            ],
            ["finished", when],
        ],
    )
    lines += ["## Targets", ""]
    targets = report.get("targets", [])
    if targets:
        lines += _table(
            ["target", "what", "value", "bound", "met"],
            [
                [
                    t["target"],
                    t["what"],
                    fmt(t["value"]),
                    t["bound"],
                    "yes" if t["met"] else "**no**",
                ]
                for t in targets
            ],
        )
    else:
        lines += ["No target could be evaluated from the suites run.", ""]
    lines += _qoper8_section(report, figures)
    lines += _latency_section(figures)
    lines += _seed_section(figures)
    lines += _pools_section(report, figures)
    if chart:
        lines += ["## Throughput chart", "", f"![throughput of every pool]({chart})", ""]
    lines += ["## Every figure, by suite", ""]
    for suite, suite_figures in report.get("suites", {}).items():
        lines += [f"### {suite}: {SUITE_TITLES.get(suite, '')}", ""]
        lines += _table(
            ["figure", "value", "unit", "what"],
            [
                [f"`{name}`", fmt(f["value"]), f["unit"], f["what"]]
                for name, f in suite_figures.items()
            ],
        )
    # The analysis is prose kept beside the code that measures, not generated.
    limits = Path(__file__).with_name("LIMITS.md")
    if limits.exists():
        lines += ["", limits.read_text().strip(), ""]
    return "\n".join(lines) + "\n"


def _qoper8_section(report: dict[str, Any], figures: dict[str, Figure]) -> list[str]:
    if "qoper8_table" not in report.get("suites", {}):
        return []
    cores = report.get("machine", {}).get("cpus")
    lines = [
        "## Q-Oper8's table beside ours",
        "",
        "Q-Oper8 (2011) published sustained throughput of a trivial handler on 4 CPUs with "
        f"Node.js 0.4; ours is on {cores} cores, so sizes past {cores} share CPUs with the "
        "master. Different machines, a decade apart: the ratio says little about the designs.",
        "",
    ]
    rows = []
    for size in range(1, 11):
        ours = figures.get(f"sustained_size_{size}_rate")
        theirs = figures.get(f"qoper8_published_size_{size}_rate")
        ratio = "—"
        if ours and theirs and is_number(ours["value"]):
            ratio = f"{ours['value'] / theirs['value']:.1f}x"
        rows.append(
            [
                str(size),
                fmt(theirs["value"]) if theirs else "—",
                fmt(ours["value"]) if ours else "—",
                _value(figures, f"sustained_size_{size}_master_cpu"),
                ratio,
            ]
        )
    lines += _table(
        ["pool size", "Q-Oper8, actions/s", "qoper8d, actions/s", "master CPU, us/action", "ratio"],
        rows,
    )
    rows = [
        [
            f"{b:,}",
            _value(figures, f"sustained_batch_{b}_rate"),
            _value(figures, f"sustained_batch_{b}_master_cpu"),
        ]
        for b in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
        if f"sustained_batch_{b}_rate" in figures or f"sustained_batch_{b}_error" in figures
    ]
    if rows:
        lines += ["`max_batch_bytes` at 2 workers:", ""]
        lines += _table(["max_batch_bytes", "actions/s", "master CPU, us/action"], rows)
    return lines


#: Each latency figure held against its floors: (label, figure, floors' prefix, ratio).
LATENCIES = (
    ("pool.run, idle, pinned (in process)", "idle_latency_pinned_p50", "idle_latency",
     "idle_latency_vs_pingpong"),
    ("Client.submit, idle daemon (over the socket)", "socket_latency_p50", "socket_latency",
     "socket_latency_vs_pingpong"),
)  # fmt: skip


def _latency_section(figures: dict[str, Figure]) -> list[str]:
    rows = [
        [
            label,
            _value(figures, name),
            _value(figures, f"{floors}_floor_blocking_p50"),
            _value(figures, f"{floors}_floor_polled_p50"),
            _value(figures, ratio),
        ]
        for label, name, floors, ratio in LATENCIES
        if name in figures
    ]
    if not rows:
        return []
    return [
        "## Latency beside its floors",
        "",
        "Each floor has its path's shape (in process: two processes pinned to two CPUs; over "
        "the socket: client, relay, echo) and is measured both ways a process can wait, "
        "blocking in `read` and polling; both in blocks alternating with the figure's own. "
        "The ratio is to the better floor of each block (median of the blocks).",
        "",
        *_table(
            ["path", "p50, us", "blocking floor, us", "polled floor, us", "/ better floor"],
            rows,
        ),
    ]


def _seed_section(figures: dict[str, Figure]) -> list[str]:
    if "seed_qoper8d_rate" not in figures:
        return []
    rows = [
        [
            label,
            _value(figures, f"seed_{key}_rate"),
            _value(figures, f"seed_{key}_master_cpu"),
            _value(figures, f"seed_{key}_worker_uss"),
            _value(figures, f"seed_{key}_worker_pss"),
            _value(figures, f"seed_{key}_startup")
            if f"seed_{key}_startup" in figures
            else _value(figures, f"seed_{key}_startup_stepwise"),
        ]
        for key, label in (
            ("qoper8d", "qoper8d (fork server, defaults)"),
            ("callers", "qoper8d, 256 tasks awaiting pool.run (same pool)"),
            ("tuned", "qoper8d, idle_spin = 0, preload"),
            ("mp", "multiprocessing.Pool (fork)"),
            ("ppe", "ProcessPoolExecutor (fork)"),
            ("bare_pipes", "bound: bare processes fed over pipes by an epoll loop"),
        )
        if f"seed_{key}_rate" in figures
    ]
    return [
        "## The seed's workload: 256 workers, 10 ms blocking sleep",
        "",
        f"Ideal: {_value(figures, 'seed_ideal_rate')} actions/s (256 / 10 ms); qoper8d / "
        f"ideal: {_value(figures, 'seed_vs_ideal')}. Start-up: every worker ready (qoper8d "
        "in steps of 64 where all at once failed: see the error figures).",
        "",
        *_table(
            [
                "pool",
                "actions/s",
                "master CPU, us/action",
                "idle worker USS, MiB",
                "PSS, MiB",
                "start-up, ms",
            ],
            rows,
        ),
    ]


def _pools_section(report: dict[str, Any], figures: dict[str, Figure]) -> list[str]:
    lines: list[str] = []
    rows = [
        [
            label,
            _value(figures, f"{prefix}_startup"),
            _value(figures, f"{prefix}_latency_p50"),
            _value(figures, f"{prefix}_latency_p99"),
        ]
        for prefix, label in FAMILIES
        if any(f"{prefix}_{k}" in figures for k in ("startup", "latency_p50", "latency_p99"))
    ]
    if rows:
        lines += ["## Pools side by side: start-up and idle latency (2 workers)", ""]
        lines += _table(["pool", "start-up, ms", "latency p50, us", "latency p99, us"], rows)
    rows = []
    for suite, name, fig in _throughputs(report):
        stem = name.removesuffix("_rate")
        rows.append(
            [
                suite,
                f"`{stem}`",
                fmt(fig["value"]),
                _value(figures, f"{stem}_master_cpu"),
                fig["what"],
            ]
        )
    if rows:
        lines += ["## Pools side by side: throughput (2 workers, trivial action)", ""]
        lines += _table(["suite", "figure", "actions/s", "master CPU, us/action", "what"], rows)
    return lines


def _throughputs(report: dict[str, Any]) -> list[tuple[str, str, Figure]]:
    """Every pool's throughput figure, fastest first: (suite, name, figure)."""
    found = [
        (suite, name, fig)
        for suite, suite_figures in report.get("suites", {}).items()
        if suite not in _NOT_IN_BARS
        for name, fig in suite_figures.items()
        if fig.get("unit") == "actions/s" and is_number(fig["value"])
    ]
    return sorted(found, key=lambda item: -item[2]["value"])


# -- the chart ---------------------------------------------------------------------------------


def _bars(ax: Any, bars: list[tuple[str, float, str, str]], title: str, unit: str) -> None:
    """Horizontal bars, log scale: (label, value, who, colour) each; ours in bold."""
    y = list(range(len(bars)))
    ax.barh(y, [b[1] for b in bars], color=[b[3] for b in bars], edgecolor="none")
    ax.set_yticks(y, [b[0] for b in bars], fontsize=8.5)
    for i, (_, value, kind, _colour) in enumerate(bars):
        ax.text(value * 1.06, i, _short(value), va="center", fontsize=8)
        if kind == "ours":
            ax.get_yticklabels()[i].set_fontweight("bold")
    ax.set_xscale("log")
    if bars:
        ax.set_xlim(min(b[1] for b in bars) / 2, max(b[1] for b in bars) * 3)
    ax.set_xlabel(f"{unit} (log scale)")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", which="both", alpha=0.25)
    import matplotlib.pyplot as plt

    present = [k for k in PALETTE if any(b[2] == k for b in bars)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[k][0]) for k in present]
    ax.legend(handles, [WHO_NAMES[k] for k in present], loc="lower right", fontsize=8.5)


def _colour(kind: str, suite: str, suites: list[str]) -> str:
    shades = PALETTE[kind]
    return shades[suites.index(suite) % len(shades)] if suite in suites else shades[0]


def _latency_bars(figures: dict[str, Figure]) -> list[tuple[str, float, str, str]]:
    bars: list[tuple[str, float, str, str]] = []
    for label, name, floors, _ratio in LATENCIES:
        if not is_number(figures.get(name, {}).get("value")):
            continue
        bars.append((label, float(figures[name]["value"]), "ours", PALETTE["ours"][0]))
        for how, shade in (("blocking", 0), ("polled", 1)):
            fig = figures.get(f"{floors}_floor_{how}_p50")
            if fig is not None and is_number(fig["value"]):
                bars.append(
                    (f"  its {how} floor", float(fig["value"]), "bound", PALETTE["bound"][shade])
                )
    for prefix, label in FAMILIES:
        fig = figures.get(f"{prefix}_latency_p50")
        if fig is not None and is_number(fig["value"]):
            kind = "ours" if prefix == "qoper8d" else "peer"
            bars.append((f"{label}, unpinned", float(fig["value"]), kind, PALETTE[kind][1]))
    return bars[::-1]


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = report.get("suites", {})
    names = list(suites)
    figures = _all_figures(report)
    bars: list[tuple[str, float, str, str]] = []
    for suite, name, found in _throughputs(report):
        label = name.removesuffix("_rate")
        if suite == "engine":
            label = f"engine: {label}"
        kind = who(suite, name, found)
        bars.append((label, float(found["value"]), kind, _colour(kind, suite, names)))
    bars.sort(key=lambda b: b[1])
    latency = _latency_bars(figures)
    table = suites.get("qoper8_table", {})
    seed = suites.get("seed", {})
    seed_bars = [
        (label, float(seed[f"seed_{key}_rate"]["value"]), kind, PALETTE[kind][0])
        for key, label, kind in (
            ("qoper8d", "qoper8d, 256 workers", "ours"),
            ("callers", "qoper8d, 256 callers of pool.run", "ours"),
            ("tuned", "qoper8d, idle_spin 0, preload", "ours"),
            ("ppe", "ProcessPoolExecutor(256)", "peer"),
            ("mp", "multiprocessing.Pool(256)", "peer"),
            ("bare_pipes", "bare: pipes + epoll", "bound"),
            ("ideal", "ideal: 256 / 10 ms", "bound"),
        )
        if is_number(seed.get(f"seed_{key}_rate", {}).get("value"))
    ]

    heights = [max(4.0, 0.32 * len(bars) + 1.2)]
    if latency:
        heights.append(0.32 * len(latency) + 1.6)
    if table:
        heights.append(4.2)
    if seed_bars:
        heights.append(0.4 * len(seed_bars) + 1.4)
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(10, sum(heights) + 0.6), gridspec_kw={"height_ratios": heights}
    )
    axes = list(axes) if len(heights) > 1 else [axes]
    m = report.get("machine", {})
    quick = " — quick run" if report.get("quick") else ""
    panel = iter(axes)
    _bars(
        next(panel),
        bars,
        f"Throughput of the trivial action, 2 workers ({m.get('cpus')} cores, "
        f"Python {m.get('python', '')}){quick}",
        "actions/s",
    )
    if latency:
        _bars(
            next(panel),
            latency,
            "Idle latency p50 beside its floors (blocking and polled, in its path's shape)",
            "microseconds",
        )
    if table:
        _table_panel(next(panel), table, m)
    if seed_bars:
        _bars(
            next(panel),
            seed_bars,
            "The seed's workload: 256 workers, a 10 ms blocking sleep each",
            "actions/s",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table_panel(ax: Any, table: dict[str, Figure], m: dict[str, Any]) -> None:
    import matplotlib

    sizes = [
        s for s in range(1, 11) if is_number(table.get(f"sustained_size_{s}_rate", {}).get("value"))
    ]
    ours = [table[f"sustained_size_{s}_rate"]["value"] for s in sizes]
    ax.plot(
        sizes, ours, "o-", color=PALETTE["ours"][0], label=f"qoper8d here ({m.get('cpus')} cores)"
    )
    published = sorted(
        (int(k.split("_")[3]), f["value"])
        for k, f in table.items()
        if k.startswith("qoper8_published_size_")
    )
    if published:
        ax.plot(
            [p[0] for p in published],
            [p[1] for p in published],
            "s--",
            color=PALETTE["peer"][0],
            markersize=7,
            label="Q-Oper8 published (4 CPUs, Node.js 0.4)",
        )
    for points, offset in ((list(zip(sizes, ours, strict=True)), 7), (published, -14)):
        for s, v in points:
            ax.annotate(
                _short(v),
                (s, v),
                textcoords="offset points",
                xytext=(0, offset),
                ha="center",
                fontsize=8,
            )
    ax.set_xticks(range(1, 11))
    ax.set_xlabel("pool size (worker processes)")
    ax.set_yscale("log")
    values = ours + [p[1] for p in published]
    if values:
        ax.set_ylim(min(values) / 3, max(values) * 3)
    ax.set_ylabel("actions/s (log scale)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _short(v)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("Q-Oper8's table: sustained throughput by pool size, all ten rows", fontsize=11)
    ax.legend(fontsize=8.5, loc="best")
    ax.grid(alpha=0.25)


def _short(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


def write(report: dict[str, Any], source: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write REPORT.md and throughput.png into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "throughput.png"
    md = out_dir / "REPORT.md"
    chart(report, png)
    md.write_text(markdown(report, source, png.name))
    return md, png


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        report: dict[str, Any] = json.load(f)
    return report
