"""The benchmark report: the generated section of bench/RESULTS.md and the charts in bench/results/.

After every `pytest bench --benchmark-only` run, bench/conftest.py hands the run to `record_run`,
which merges its medians into bench/results/cpu-<N>-threads.json (one file per thread count; a
benchmark that ran again replaces its old entry, the others stay), and then calls
`write_report`, which rewrites the part of bench/RESULTS.md between the two markers, and the PNG
charts, from every stored run. By hand:

    python bench/report.py                      # rewrite RESULTS.md and the charts from the stored runs
    python bench/report.py run.json [more.json] # merge pytest-benchmark JSON files first

Tables: one per workload, order, measure and thread count (rows: providers; columns: inner steps
S; each median with its ratio to pymaml's fastest backend in the table), the W1 scaling sweeps,
and peak memory. Charts: speed-up over each peer and ms against S per workload, ms against T and
against width (W1), peak memory against S.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
BEGIN = "<!-- begin: written by bench/report.py from bench/results/*.json; edit the code, not this text -->"
END = "<!-- end: written by bench/report.py -->"

SWEEP = re.compile(r"W1 sinusoid T=(\d+) width=(\d+)")
WORKLOAD = re.compile(r"(.*) S=(\d+) (.*)")
METASTEP_GROUP = re.compile(r"(meta-gradient|train step) S=(\d+) (.*)")
MEASURES = ("train step", "meta-gradient", "peak memory")
RATIO_BASES = ("pymaml-cpp", "cpp", "pymaml-func", "func")  # the first present is the ratios' base
LEVEL_ORDER = ("x86-64-v4", "x86-64-v3", "baseline")


def normalize(bench: dict, date: str) -> dict | None:
    """One pytest-benchmark entry as a flat record, or None for entries the report does not use."""
    info = bench.get("extra_info", {})
    record = dict(threads=info.get("threads", 1), provider=info.get("provider", bench["name"]), date=date,
                  median_ms=bench["stats"]["median"] * 1e3, rounds=bench["stats"].get("rounds"),
                  oracle_error=info.get("oracle_error"), prepare_seconds=info.get("prepare_seconds") or 0.0,
                  gflops=info.get("gflops_per_second"))
    if bench.get("group") == "peak":
        return dict(record, workload="torch.mm 1024²", measure="peak", steps=0, order="")
    if "workload" in info:
        match = WORKLOAD.match(info["workload"])
        if match is None:
            return None
        measure = info.get("measure") or ("peak memory" if "peak_rss_mb" in info else "train step")
        record.update(workload=match.group(1), steps=int(match.group(2)), order=match.group(3), measure=measure)
        if "peak_rss_mb" in info:
            record.update(peak_rss_mb=info["peak_rss_mb"], setup_rss_mb=info.get("setup_rss_mb"))
        if "gpu_peak_mb" in info:  # torch.cuda.max_memory_allocated of a provider on a GPU
            record["gpu_peak_mb"] = info["gpu_peak_mb"]
        return record
    match = METASTEP_GROUP.match(bench.get("group") or "")
    if match is None:
        return None
    return dict(record, workload="W1 sinusoid, pymaml backends", measure=match.group(1), steps=int(match.group(2)),
                order=match.group(3))


def machine_description(machine: dict) -> str:
    """The CPU a run measured: its name and family (machines of one name differ), cores,
    architecture and the best ISA level of pymaml's CPU kernels there (conftest records it)."""
    cpu = machine.get("cpu", {})
    name = cpu.get("brand_raw") or machine.get("processor") or machine.get("machine", "?")
    family = f" (family {cpu['family']})" if cpu.get("family") is not None else ""
    level = f"best CPU level {machine['pymaml_cpu_level']}" if machine.get("pymaml_cpu_level") else ""
    parts = [f"{name}{family}", f"{cpu.get('count', '?')} cores", cpu.get("arch_string_raw", machine.get("machine", "")),
             level]
    return ", ".join(part for part in parts if part)


def machine_id(description: str) -> str:
    """A short file-name part for a machine_description: its name, family and level."""
    parts = description.split(", ")
    level = [part.removeprefix("best CPU level ") for part in parts[1:] if part.startswith("best CPU level ")]
    return _slug(" ".join(parts[:1] + level))


def results_path(results_dir: Path, threads: int, description: str) -> Path:
    """One file per machine and thread count: runs on different CPUs never overwrite each other."""
    return results_dir / f"cpu-{threads}-threads-{machine_id(description)}.json"


def record_run(output_json: dict, versions: dict | None = None, results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Merge one run (pytest-benchmark's JSON) into the stored results, per machine and thread count."""
    date = output_json.get("datetime", "")[:10]
    description = machine_description(output_json.get("machine_info", {}))
    by_threads: dict = defaultdict(dict)
    for bench in output_json.get("benchmarks", []):
        record = normalize(bench, date)
        if record is not None:
            by_threads[record["threads"]][bench["fullname"]] = record
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for threads, records in by_threads.items():
        path = results_path(results_dir, threads, description)
        stored = json.loads(path.read_text()) if path.exists() else {"benchmarks": {}}
        stored["benchmarks"].update(records)
        stored["machine"] = description
        stored["versions"] = versions or stored.get("versions", {})
        path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        written.append(path)
    return written


def load_records(results_dir: Path = RESULTS_DIR) -> dict[str, tuple[list[dict], dict]]:
    """{machine: (records, {file stem: machine and versions})}, machines in name order."""
    machines: dict = defaultdict(lambda: ([], {}))
    for path in sorted(results_dir.glob("cpu-*-threads-*.json")):
        stored = json.loads(path.read_text())
        records, meta = machines[stored.get("machine", "?")]
        records += stored["benchmarks"].values()
        meta[path.stem] = {"machine": stored.get("machine"), "versions": stored.get("versions", {})}
    return dict(sorted(machines.items()))


def _ratio_base(columns: dict) -> str | None:
    """pymaml's backend in the table: its one CPU level (per_level_tables), or the first of RATIO_BASES."""
    present = {provider for entries in columns.values() for provider in entries}
    levels = sorted(p for p in present if p.startswith("cpp@"))
    if len(levels) == 1:
        return levels[0]
    return next((base for base in RATIO_BASES if base in present), None)


def timing_tables(records: list[dict]) -> dict:
    """{(threads, title, measure): {S: {provider: record}}} for the timed workloads (sweeps apart)."""
    tables: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["measure"] in ("train step", "meta-gradient") and not SWEEP.match(r["workload"]):
            tables[(r["threads"], f"{r['workload']}, {r['order']}", r["measure"])][r["steps"]][r["provider"]] = r
    return tables


def sweep_points(records: list[dict]) -> dict:
    """{(threads, measure, suite): {provider: {(T, S, width): record}}}: the W1 sweeps (suite "" for
    the peers', ", pymaml backends" for pymaml's own), plus the peers' W1 table's T=25 width-40 points."""
    sweep: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        match = SWEEP.match(r["workload"])
        if match and r["measure"] in ("train step", "meta-gradient"):
            tasks, width = map(int, match.groups())
            key = (r["threads"], r["measure"], r["workload"][match.end():])
            sweep[key][r["provider"]][(tasks, r["steps"], width)] = r
    for r in records:
        key = (r["threads"], r["measure"], "")
        if (r["workload"] == "W1 sinusoid" and r["order"] == "second order" and key in sweep
                and r["provider"] in sweep[key]):
            sweep[key][r["provider"]][(25, r["steps"], 40)] = r
    return sweep


def memory_tables(records: list[dict]) -> dict:
    tables: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["measure"] == "peak memory" and "peak_rss_mb" in r:
            tables[(r["threads"], f"{r['workload']}, {r['order']}")][r["steps"]][r["provider"]] = r
    return tables


def _threads_label(threads: int) -> str:
    return "1 thread" if threads == 1 else f"{threads} threads"


def per_level_tables(columns: dict) -> list[tuple[str, dict]]:
    """A table whose providers include pymaml's CPU kernels at several ISA levels (providers
    "cpp@<level>") as one table per level: that level's row beside every provider that is not a
    level, with the ratios taken to that level. Other tables as they are, with no suffix."""
    levels = sorted({p.split("@", 1)[1] for entries in columns.values() for p in entries if p.startswith("cpp@")},
                    key=lambda level: LEVEL_ORDER.index(level) if level in LEVEL_ORDER else len(LEVEL_ORDER))
    if not levels:
        return [("", columns)]
    return [(f", cpp at {level}",
             {s: {p: r for p, r in entries.items() if "@" not in p or p == f"cpp@{level}"} for s, entries in columns.items()})
            for level in levels]


def timing_markdown(tables: dict) -> list[str]:
    lines = []
    order = sorted(tables, key=lambda k: (k[0], not k[1].startswith("W1 sinusoid, s"), k[1],
                                           MEASURES.index(k[2]) if k[2] in MEASURES else 9))
    for key, suffix, columns in [(key, *split) for key in order for split in per_level_tables(tables[key])]:
        threads, title, measure = key
        title += suffix
        steps = sorted(columns)
        base = _ratio_base(columns)
        providers = sorted({p for s in steps for p in columns[s]},
                           key=lambda p: min((columns[s][p]["median_ms"] for s in steps if p in columns[s])))
        lines += [f"#### {title}: {measure}, {_threads_label(threads)}", "",
                  "| provider | " + " | ".join(f"S={s} ms | ÷ {base}" for s in steps) + " |",
                  "|---|" + "---|---|" * len(steps)]
        for provider in providers:
            cells = []
            for s in steps:
                entry, reference = columns[s].get(provider), columns[s].get(base)
                if entry is None:
                    cells += ["—", "—"]
                    continue
                extra = f" (+{entry['prepare_seconds']:.1f} s compile)" if entry["prepare_seconds"] > 0.05 else ""
                if entry.get("gflops"):
                    extra += f" ({entry['gflops']:.0f} GFLOP/s)"
                ratio = f"{entry['median_ms'] / reference['median_ms']:.1f}" if reference else "—"
                cells += [f"{entry['median_ms']:.3f}{extra}", ratio]
            lines.append(f"| {provider} | " + " | ".join(cells) + " |")
        errors = [r["oracle_error"] for s in steps for r in columns[s].values() if r.get("oracle_error") is not None]
        dates = sorted({r["date"] for s in steps for r in columns[s].values()})
        note = f"Measured {', '.join(dates)}."
        if errors:
            note += f" Meta-gradients against the float64 oracle before timing: relative errors {min(errors):.0e} " \
                    f"to {max(errors):.0e}."
        lines += ["", note, ""]
    return lines


def sweep_markdown(sweep: dict) -> list[str]:
    """One table per sweep axis; the width axis also gives GFLOP/s and each provider's worst
    width's rate over its best's."""
    lines = []
    axes = (("T (S=1, width 40)", 0, lambda k: k[1] == 1 and k[2] == 40),
            ("S (T=25, width 40)", 1, lambda k: k[0] == 25 and k[2] == 40),
            ("hidden width (T=25, S=1)", 2, lambda k: k[0] == 25 and k[1] == 1))
    for (threads, measure, suite) in sorted(sweep):
        providers = sweep[(threads, measure, suite)]
        for title, axis, fixed in axes:
            values = sorted({k[axis] for points in providers.values() for k in points if fixed(k)})
            if len(values) < 2:
                continue
            rates = axis == 2 and any(r.get("gflops") for points in providers.values() for r in points.values())
            lines += [f"#### W1{suite} second order, ms per {measure} against {title}, {_threads_label(threads)}", "",
                      "| provider | " + " | ".join(str(v) for v in values) + (" | worst ÷ best GFLOP/s |" if rates else " |"),
                      "|---|" + "---|" * (len(values) + rates)]
            for provider, points in sorted(providers.items()):
                chosen = {k[axis]: r for k, r in points.items() if fixed(k)}
                cells = []
                for v in values:
                    r = chosen.get(v)
                    cell = "—" if r is None else f"{r['median_ms']:.3f}"
                    if r is not None and rates and r.get("gflops"):
                        cell += f" ({r['gflops']:.0f})"
                    cells.append(cell)
                gflops = [r["gflops"] for r in chosen.values() if r.get("gflops")]
                if rates:
                    cells.append(f"{min(gflops) / max(gflops):.2f}" if len(gflops) > 1 else "—")
                lines.append(f"| {provider} | " + " | ".join(cells) + " |")
            lines.append("")
            if rates:
                lines += ["GFLOP/s in brackets: the meta-step's counted FLOPs over its median.", ""]
    return lines


def memory_markdown(tables: dict) -> list[str]:
    lines = []
    for (threads, title), columns in sorted(tables.items()):
        steps = sorted(columns)
        lines += [f"#### {title}: peak resident memory (MB), each provider in its own process, "
                  f"{_threads_label(threads)}", "",
                  "| provider | " + " | ".join(f"S={s} peak | growth" for s in steps) + " |",
                  "|---|" + "---|---|" * len(steps)]
        for provider in sorted({p for s in steps for p in columns[s]}):
            cells = []
            for s in steps:
                entry = columns[s].get(provider)
                if entry is None:
                    cells += ["—", "—"]
                else:
                    growth = entry["peak_rss_mb"] - entry["setup_rss_mb"] if entry.get("setup_rss_mb") else None
                    gpu = f" (GPU {entry['gpu_peak_mb']:.0f})" if "gpu_peak_mb" in entry else ""
                    cells += [f"{entry['peak_rss_mb']:.0f}{gpu}", "—" if growth is None else f"{growth:.0f}"]
            lines.append(f"| {provider} | " + " | ".join(cells) + " |")
        lines += ["", "Growth: peak minus the process's resident memory after set-up (model, data, imports).", ""]
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def charts(tables: dict, sweep: dict, memory: dict, out: Path, prefix: str) -> list[Path]:
    """The PNG charts of one machine's runs, named `prefix`_<what>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (threads, title, measure), columns in sorted(tables.items()):
        if threads != 1 or measure != "train step" or len(columns) < 1:
            continue
        steps = sorted(columns)
        base = _ratio_base(columns)
        figure, (speedup, against_s) = plt.subplots(1, 2, figsize=(11, 4))
        providers = sorted({p for s in steps for p in columns[s]} - {base})
        width = 0.8 / max(len(steps), 1)
        for i, s in enumerate(steps):
            reference = columns[s].get(base)
            values = [columns[s][p]["median_ms"] / reference["median_ms"] if reference and p in columns[s] else 0
                      for p in providers]
            speedup.bar([j + i * width for j in range(len(providers))], values, width, label=f"S={s}")
        speedup.set_xticks([j + width * (len(steps) - 1) / 2 for j in range(len(providers))])
        speedup.set_xticklabels(providers, rotation=40, ha="right", fontsize=8)
        speedup.set_yscale("log")
        speedup.set_ylabel(f"provider ms ÷ {base} ms")
        speedup.set_title(f"{title}: speed-up of {base}", fontsize=9)
        speedup.legend()
        for provider in providers + [base]:
            xs = [s for s in steps if provider in columns[s]]
            against_s.plot(xs, [columns[s][provider]["median_ms"] for s in xs], marker="o", label=provider)
        against_s.set_yscale("log")
        against_s.set_xlabel("inner steps S")
        against_s.set_ylabel("ms per training step")
        against_s.set_title("ms against S", fontsize=9)
        against_s.legend(fontsize=7)
        figure.tight_layout()
        written.append(out / f"{prefix}_{_slug(title)}_train_step.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    points = {provider: {k: r["median_ms"] for k, r in by_point.items()}
              for provider, by_point in sweep.get((1, "train step", ""), {}).items()}
    if points:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, index, fixed, label in ((axes[0], 0, lambda k: k[1] == 1 and k[2] == 40, "tasks T (S=1, width 40)"),
                                          (axes[1], 2, lambda k: k[0] == 25 and k[1] == 1, "hidden width (T=25, S=1)")):
            for provider, by_point in sorted(points.items()):
                xs = sorted(k[index] for k in by_point if fixed(k))
                axis.plot(xs, [next(ms for k, ms in by_point.items() if fixed(k) and k[index] == x) for x in xs],
                          marker="o", label=provider)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel("ms per training step")
            axis.legend(fontsize=7)
        axes[0].set_title("W1 second order: ms against T", fontsize=9)
        axes[1].set_title("W1 second order: ms against width", fontsize=9)
        figure.tight_layout()
        written.append(out / f"{prefix}_w1_scaling.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    for (threads, title), columns in sorted(memory.items()):
        if threads != 1:
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        steps = sorted(columns)
        for provider in sorted({p for s in steps for p in columns[s]}):
            xs = [s for s in steps if provider in columns[s] and columns[s][provider].get("setup_rss_mb")]
            axis.plot(xs, [columns[s][provider]["peak_rss_mb"] - columns[s][provider]["setup_rss_mb"] for s in xs],
                      marker="o", label=provider)
        axis.set_xlabel("inner steps S")
        axis.set_ylabel("peak RSS growth over set-up (MB)")
        axis.set_title(f"{title}: memory against S", fontsize=9)
        axis.legend(fontsize=7)
        figure.tight_layout()
        written.append(out / f"{prefix}_{_slug(title)}_memory.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written


def machine_section(machine: str, records: list[dict], meta: dict, chart_paths: list[Path], folder: Path) -> str:
    lines = [f"### {machine}", ""]
    for name, info in sorted(meta.items()):
        versions = ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items()))
        lines.append(f"- `{name}`: latest run's versions: {versions or 'not recorded'}.")
    lines.append("")
    if chart_paths:
        prefix = machine_id(machine) + "_"
        links = [f"[{p.stem.removeprefix(prefix)}]({Path(os.path.relpath(p, folder)).as_posix()})" for p in chart_paths]
        lines += ["Charts: " + ", ".join(links), ""]
    peak = [r for r in records if r["measure"] == "peak"]
    for r in peak:
        lines += [f"A 1024² `torch.mm` reaches {r['gflops']:.1f} GFLOP/s ({_threads_label(r['threads'])}, "
                  f"{r['date']}).", ""]
    lines += timing_markdown(timing_tables(records))
    lines += sweep_markdown(sweep_points(records))
    lines += memory_markdown(memory_tables(records))
    return "\n".join(lines)


def write_report(results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD) -> list[Path]:
    """Rewrite the generated section of RESULTS.md and the charts from the stored runs, one part per machine."""
    machines = load_records(results_dir)
    if not machines:
        return []
    parts = [BEGIN, "", "## Benchmark tables", "",
             "Medians of pytest-benchmark rounds, one part per machine. A ratio is the provider's median over the "
             "median of the pymaml backend named in the column, measured in the same run on the same machine.", ""]
    chart_paths = []
    for machine, (records, meta) in machines.items():
        paths = charts(timing_tables(records), sweep_points(records), memory_tables(records), results_dir,
                       machine_id(machine))
        parts.append(machine_section(machine, records, meta, paths, results_md.parent))
        chart_paths += paths
    section = "\n".join(parts + [END])
    text = results_md.read_text() if results_md.exists() else "# Measured results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    results_md.write_text(text)
    return [results_md, *chart_paths]


def installed_versions() -> dict:
    """Versions of Python, pymaml (with its git commit where known), torch and the peers."""
    import platform
    import subprocess
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("pymaml", "torch", "learn2learn", "higher", "torchopt", "jax", "jaxlib", "optax"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if commit:
            versions["pymaml"] = f"{versions.get('pymaml', '?')} ({commit})"
    except (OSError, subprocess.SubprocessError):
        pass
    return versions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON files to merge into the stored runs first")
    args = parser.parse_args(argv)
    for path in args.json:
        record_run(json.loads(Path(path).read_text()))
    for path in write_report():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
