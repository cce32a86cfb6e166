"""Turns the cross-library benchmark's pytest-benchmark JSON into markdown tables (one per
workload) and PNG charts (speed-up of pymaml's `cpp` over each provider; ms against S).

python bench/report.py peers.json [--out bench/peers]   # writes peers.md and the PNGs there
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from collections import defaultdict
from pathlib import Path


def load(path: str):
    """{workload: {S: {provider: (median ms, oracle error, prepare s)}}}, and the run's metadata."""
    with open(path) as handle:
        data = json.load(handle)
    table: dict = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "workload" not in info:
            continue
        match = re.match(r"(.*) S=(\d+) (.*)", info["workload"])
        workload, steps = f"{match.group(1)}, {match.group(3)}", int(match.group(2))
        table[workload][steps][info["provider"]] = (bench["stats"]["median"] * 1e3, info.get("oracle_error"),
                                                     info.get("prepare_seconds", 0.0))
    return table, data


def markdown(table, data) -> str:
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')[:10]}; "
        f"threads: {next(iter(data['benchmarks']), {}).get('extra_info', {}).get('threads', '?')}. "
        "Median ms per training step (meta-gradient plus Adam); ratio = provider ÷ pymaml-cpp; "
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
    parser.add_argument("json", help="pytest-benchmark JSON of bench/test_peers.py")
    parser.add_argument("--out", default="bench/peers", help="folder for peers.md and the charts")
    args = parser.parse_args(argv)
    table, data = load(args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(markdown(table, data) + "\n")
    for path in [out / "peers.md", *charts(table, out)]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
