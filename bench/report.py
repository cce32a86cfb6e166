"""Turns the cross-library benchmark's pytest-benchmark JSON into markdown tables (one per
workload, the W1 scaling sweeps, peak memory) and PNG charts (speed-up of pymaml's `cpp` over
each provider, ms against S, ms against T and width, memory against S).

python bench/report.py peers.json [peers-2-threads.json ...] [--out bench/peers]   # peers.md and PNGs
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from collections import defaultdict
from pathlib import Path


SWEEP = re.compile(r"W1 sinusoid T=(\d+) width=(\d+) S=(\d+) second order")


def load(paths):
    """Timings {workload: {S: {provider: (median ms, oracle error, prepare s)}}}, W1 sweep points
    {provider: {(T, S, width): ms}}, peak memory {S: {provider: (peak MB, after set-up MB)}},
    and the run's metadata."""
    data = {"benchmarks": []}
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path) as handle:
            run = json.load(handle)
        data = {**run, "benchmarks": data["benchmarks"] + run["benchmarks"]}
    table: dict = defaultdict(lambda: defaultdict(dict))
    sweep: dict = defaultdict(dict)
    memory: dict = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "workload" not in info:
            continue
        median = bench["stats"]["median"] * 1e3
        match = re.match(r"(.*) S=(\d+) (.*)", info["workload"])
        steps = int(match.group(2))
        threads = info.get("threads", 1)
        if "peak_rss_mb" in info:
            memory[steps][info["provider"]] = (info["peak_rss_mb"], info["setup_rss_mb"])
        elif SWEEP.match(info["workload"]) and threads == 1:
            tasks, width, steps = map(int, SWEEP.match(info["workload"]).groups())
            sweep[info["provider"]][(tasks, steps, width)] = median
        elif not SWEEP.match(info["workload"]):
            workload = f"{match.group(1)}, {match.group(3)}" + (f", {threads} threads" if threads != 1 else "")
            table[workload][steps][info["provider"]] = (median, info.get("oracle_error"),
                                                         info.get("prepare_seconds", 0.0))
    base = table.get("W1 sinusoid, second order", {})
    for steps, providers in base.items():
        for provider, (median, _, _) in providers.items():
            if provider in sweep:
                sweep[provider][(25, steps, 40)] = median
    return table, sweep, memory, data


def sweep_markdown(sweep) -> list[str]:
    lines = []
    for title, axis, fixed in (("T (S=1, width 40)", 0, lambda k: k[1] == 1 and k[2] == 40),
                               ("S (T=25, width 40)", 1, lambda k: k[0] == 25 and k[2] == 40),
                               ("hidden width (T=25, S=1)", 2, lambda k: k[0] == 25 and k[1] == 1)):
        values = sorted({k[axis] for points in sweep.values() for k in points if fixed(k)})
        if len(values) < 2:
            continue
        lines += [f"### W1 second order, ms per training step against {title}", "",
                  "| provider | " + " | ".join(str(v) for v in values) + " |", "|---|" + "---|" * len(values)]
        for provider, points in sorted(sweep.items()):
            cells = [next((f"{ms:.3f}" for k, ms in points.items() if fixed(k) and k[axis] == v), "—")
                     for v in values]
            lines.append(f"| {provider} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def memory_markdown(memory) -> list[str]:
    if not memory:
        return []
    steps = sorted(memory)
    lines = ["### W1 second order, peak resident memory (MB) of a training step, own process", "",
             "| provider | " + " | ".join(f"S={s} peak | after set-up" for s in steps) + " |",
             "|---|" + "---|---|" * len(steps)]
    for provider in sorted({p for s in steps for p in memory[s]}):
        cells = []
        for s in steps:
            peak, setup = memory[s].get(provider, (None, None))
            cells += ["—", "—"] if peak is None else [f"{peak:.0f}", f"{setup:.0f}"]
        lines.append(f"| {provider} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(table, data) -> str:
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')[:10]}; one thread unless a "
        "table says otherwise. Median ms per training step (meta-gradient plus Adam); ratio = provider ÷ pymaml-cpp; "
        "every provider's meta-gradient matched the oracle (relative error ≤ 1e-4) before it was timed.",
        "",
    ]
    for workload, by_steps in table.items():
        steps = sorted(by_steps)
        providers = sorted({p for s in steps for p in by_steps[s]},
                           key=lambda p: by_steps[steps[0]].get(p, (float("inf"),))[0])
        lines.append(f"### {workload}")
        lines.append("")
        lines.append("| provider | " + " | ".join(f"S={s} ms | ÷ cpp" for s in steps) + " |")
        lines.append("|---|" + "---|---|" * len(steps))
        for provider in providers:
            cells = []
            for s in steps:
                entry = by_steps[s].get(provider)
                base = by_steps[s].get("pymaml-cpp")
                if entry is None:
                    cells += ["—", "—"]
                else:
                    ratio = f"{entry[0] / base[0]:.1f}" if base else "—"
                    prepare = f" (+{entry[2]:.1f} s compile)" if entry[2] and entry[2] > 0.05 else ""
                    cells += [f"{entry[0]:.3f}{prepare}", ratio]
            lines.append(f"| {provider} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def sweep_and_memory_charts(sweep, memory, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if sweep:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, index, fixed, label in ((axes[0], 0, lambda k: k[1] == 1 and k[2] == 40, "tasks T (S=1, width 40)"),
                                          (axes[1], 2, lambda k: k[0] == 25 and k[1] == 1, "hidden width (T=25, S=1)")):
            for provider, points in sorted(sweep.items()):
                xs = sorted(k[index] for k in points if fixed(k))
                axis.plot(xs, [next(ms for k, ms in points.items() if fixed(k) and k[index] == x) for x in xs],
                          marker="o", label=provider)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("ms per training step")
            axis.legend(fontsize=7)
        axes[0].set_title("W1 second order: ms against T")
        axes[1].set_title("W1 second order: ms against width")
        figure.tight_layout()
        written.append(out / "w1_scaling.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    if memory:
        figure, axis = plt.subplots(figsize=(6, 4))
        steps = sorted(memory)
        for provider in sorted({p for s in steps for p in memory[s]}):
            xs = [s for s in steps if provider in memory[s]]
            axis.plot(xs, [memory[s][provider][0] for s in xs], marker="o", label=provider)
        axis.set_xlabel("inner steps S")
        axis.set_ylabel("peak RSS (MB)")
        axis.set_title("W1 second order: memory against S")
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(out / "w1_memory.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


def charts(table, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for workload, by_steps in table.items():
        slug = re.sub(r"[^a-z0-9]+", "_", workload.lower()).strip("_")
        steps = sorted(by_steps)
        figure, (speedup, against_s) = plt.subplots(1, 2, figsize=(11, 4))
        providers = sorted({p for s in steps for p in by_steps[s]} - {"pymaml-cpp"})
        width = 0.8 / max(len(steps), 1)
        for i, s in enumerate(steps):
            base = by_steps[s].get("pymaml-cpp")
            values = [by_steps[s][p][0] / base[0] if base and p in by_steps[s] else 0 for p in providers]
            speedup.bar([j + i * width for j in range(len(providers))], values, width, label=f"S={s}")
        speedup.set_xticks([j + width * (len(steps) - 1) / 2 for j in range(len(providers))])
        speedup.set_xticklabels(providers, rotation=40, ha="right")
        speedup.set_yscale("log")
        speedup.set_ylabel("provider ms ÷ pymaml-cpp ms")
        speedup.set_title(f"{workload}: speed-up of pymaml-cpp")
        speedup.legend()
        for provider in providers + ["pymaml-cpp"]:
            xs = [s for s in steps if provider in by_steps[s]]
            against_s.plot(xs, [by_steps[s][provider][0] for s in xs], marker="o", label=provider)
        against_s.set_yscale("log")
        against_s.set_xlabel("inner steps S")
        against_s.set_ylabel("ms per training step")
        against_s.set_title("ms against S")
        against_s.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"{slug}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON of bench/test_peers.py (one per thread count)")
    parser.add_argument("--out", default="bench/peers", help="folder for peers.md and the charts")
    args = parser.parse_args(argv)
    table, sweep, memory, data = load(args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([markdown(table, data), *sweep_markdown(sweep), *memory_markdown(memory)])
    (out / "peers.md").write_text(text.rstrip() + "\n")
    for path in [out / "peers.md", *charts(table, out), *sweep_and_memory_charts(sweep, memory, out)]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
