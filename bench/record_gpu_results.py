"""The markdown section for bench/RESULTS.md from one bench/gpu_check.py result file.

    python bench/record_gpu_results.py gpu_check_results/gpu_check.json            # prints it
    python bench/record_gpu_results.py gpu_check_results/gpu_check.json --append bench/RESULTS.md

Every figure comes from the file; nothing is measured here.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys


def _number(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _error(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _status_line(name: str, section: dict) -> str:
    text = f"{name}: {section.get('status', 'not run')}, {section.get('elapsed_s', 0):.1f} s"
    if section.get("status") in ("error", "timeout"):
        text += f" ({str(section.get('error', '')).strip().splitlines()[-1][:160]})"
    return text


def environment_lines(section: dict) -> list:
    info = section.get("result", {})
    device = info.get("device", {})
    build = info.get("build_info", {})
    lines = [f"Device: {device.get('name', '?')}"
             + (f" (compute capability {device['capability']}, {device['multiprocessors']} SMs, "
                f"{device['memory_gib']} GiB)" if "capability" in device else "")
             + f"; torch {info.get('torch', '?')} (CUDA {info.get('torch_cuda')}), Triton {info.get('triton', '?')}, "
               f"Python {info.get('python', '?')}, {info.get('cpu_count', '?')} CPU cores.",
             f"pymaml build: {', '.join(f'{k} {v}' for k, v in build.items())}."]
    unusable = {name: status.get("reason") for name, status in info.get("backends", {}).items()
                if not status.get("usable")}
    if unusable:
        lines.append("Backends not usable: " + "; ".join(f"`{name}` ({reason})" for name, reason in unusable.items())
                     + ".")
    return lines


def correctness_lines(section: dict, baseline: str) -> list:
    cases = section.get("result", {}).get("cases", [])
    rows = []
    for case in cases:
        if case.get("status") == "ran":
            errors = case.get("errors", {})
            verdict = "ok" if case.get("ok") else "**WRONG**"
            rows.append([case["case"], case["dtype"], f"`{case['backend']}`", _error(errors.get("loss")),
                         _error(errors.get("task_losses")), _error(errors.get("grads")), _error(case.get("tolerance")),
                         _error(case.get("baseline_max_error")), verdict])
        else:
            reason = case.get("reason") or str(case.get("error", "")).strip().splitlines()[-1:] or [""]
            reason = reason if isinstance(reason, str) else reason[0]
            verdict = "**ERROR**" if case.get("status") == "error" else case.get("status", "?")
            rows.append([case.get("case"), case.get("dtype"), f"`{case.get('backend', '-')}`", "-", "-", "-",
                         _error(case.get("tolerance")), "-", f"{verdict}: {reason[:120]}"])
    lines = ["Relative errors against the float64 oracle (pymaml/reference.py) on the same values; the baseline "
             f"column is the `{baseline}` backend's largest error in the same dtype.", ""]
    lines += _table(["case", "dtype", "backend", "loss", "task losses", "gradients", "tolerance", "baseline",
                     "verdict"], rows)
    failures = section.get("result", {}).get("failures", [])
    lines += ["", "All cases within tolerance." if not failures else "Outside tolerance: " + "; ".join(failures) + "."]
    return lines


def launches_lines(section: dict) -> list:
    rows = []
    for backend, entry in section.get("result", {}).items():
        if not isinstance(entry, dict) or "status" in entry and isinstance(entry["status"], str):
            status = entry.get("status", "?") if isinstance(entry, dict) else "?"
            rows.append([f"`{backend}`", "-", "-", "-", "-", status])
            continue
        for what, counted in entry.items():
            if not isinstance(counted, dict) or "kernels" not in counted:
                rows.append([f"`{backend}`", what, "-", "-", "-", "error"])
                continue
            names = ", ".join(f"{name} ×{count}" if count > 1 else name
                              for name, count in sorted(counted["kernel_names"].items()))
            rows.append([f"`{backend}`", what, counted["kernels"], counted["memory_operations"],
                         counted["synchronizations"], names[:300]])
    return _table(["backend", "call", "kernels", "memory operations", "synchronizations", "kernels run"], rows)


def resources_lines(section: dict) -> list:
    result = section.get("result", {})
    rows = []
    for kernel in result.get("cuda", {}).get("kernels", []):
        rows.append(["cuda", f"sm_{kernel.get('arch')}", f"`{kernel.get('function', '')[:70]}`", kernel.get("reg"),
                     kernel.get("shared"), kernel.get("stack"), kernel.get("local")])
    for kernel in result.get("triton", []):
        if "kernel" in kernel:
            rows.append(["triton", kernel.get("device"), f"`{kernel['kernel']}`", kernel.get("n_regs"),
                         kernel.get("shared"), "-",
                         f"spills {kernel.get('n_spills')}, warps {kernel.get('num_warps')}"])
    if not rows:
        return [f"No compiled kernels found ({result.get('cuda', {}).get('reason', 'cuobjdump listed none')})."]
    return _table(["launcher", "arch", "kernel", "registers", "shared bytes", "stack bytes", "local / other"], rows)


def occupancy_lines(section: dict) -> list:
    result = section.get("result", {})
    rows = []
    for row in result.get("rows", []):
        if row.get("skipped"):
            rows.append([row["workload"], "-", "-", f"not run: {row['skipped'][:120]}"])
        for label, setting in row.get("settings", {}).items():
            if "ms" in setting:
                same = "yes" if setting["bitwise_equal"] else "**NO**"
                rows.append([row["workload"], label, _number(setting["ms"]), same])
            else:
                outcome = setting.get("status", "?") + " " + setting.get("error", "")[:120]
                rows.append([row["workload"], label, "-", outcome])
    return [f"The `{result.get('backend')}` fused op alone, median ms (CUDA events), and whether its outputs are "
            f"bitwise those of the launcher's own setting.", ""] + _table(
        ["workload", "launch", "ms", "bitwise equal"], rows)


def sanitizer_lines(section: dict) -> list:
    result = section.get("result", {})
    if result.get("skipped"):
        return [f"Not run: {result['skipped']}."]
    rows = [[run["tool"], f"`{run['backend']}`", run.get("rc"), run.get("errors"), run.get("warnings"),
             run.get("seconds"), "ok" if run.get("ok") else "**FAILED**"] for run in result.get("runs", [])]
    not_run = "".join(f" Not run on `{b}`: {reason}." for b, reason in result.get("backends_not_run", {}).items())
    return [f"compute-sanitizer: `{result.get('executable')}`.{not_run}", ""] + _table(
        ["tool", "backend", "exit", "errors", "warnings", "seconds", "verdict"], rows)


def timing_lines(section: dict, baseline: str, backends: list) -> list:
    result = section.get("result", {})
    rows = []
    for row in result.get("rows", []):
        cells = [row["workload"], row["tasks"], row["steps"]]
        cells += [_number(row["ms"].get(p)) for p in [baseline, *backends]]
        cells += [_number(row.get("speedup_over_baseline", {}).get(b), 1) for b in backends]
        rows.append(cells)
    header = ["workload", "T", "S", *(f"`{p}` ms" for p in [baseline, *backends]),
              *(f"`{baseline}` ÷ `{b}`" for b in backends)]
    lines = [f"{result.get('method', '')}.", ""] + _table(header, rows)
    notes = [f"{row['workload']} `{b}`: {note.strip().splitlines()[-1][:160]}" for row in result.get("rows", [])
             for b, note in row.get("notes", {}).items()]
    if notes:
        lines += ["", "Not timed: " + "; ".join(notes) + "."]
    return lines


def markdown(data: dict) -> str:
    """The section for bench/RESULTS.md."""
    sections = data.get("sections", {})
    plan = data.get("plan", {})
    baseline, backends = plan.get("baseline", "func"), plan.get("backends", [])
    title = "GPU check" if data.get("mode") == "gpu" else "GPU check (dry run on the CPU: stand-ins, not GPU figures)"
    lines = [f"## {title}, {data.get('started_utc', '?')}", "",
             f"`{data.get('command', 'bench/gpu_check.py')}`, {data.get('elapsed_s', 0):.0f} s"
             + ("" if data.get("finished") else ", **did not finish**")
             + (f" ({data['watchdog']})" if data.get("watchdog") else "") + ".", ""]
    if "environment" in sections:
        lines += environment_lines(sections["environment"]) + [""]
    lines += ["Sections: " + "; ".join(_status_line(name, section) for name, section in sections.items()) + ".", ""]
    against = functools.partial(correctness_lines, baseline=baseline)
    parts = [("Against the oracle", "correctness", against),
             ("Against the oracle: the compiled backends", "correctness_compiled", against),
             ("Kernel launches per call", "launches", launches_lines),
             ("Kernel resources", "resources", resources_lines),
             ("Launch settings", "occupancy", occupancy_lines),
             ("compute-sanitizer", "sanitizer", sanitizer_lines)]
    for heading, name, render in parts:
        if name in sections:
            lines += [f"### {heading}", ""] + render(sections[name]) + [""]
    if "timing" in sections:
        lines += ["### Meta-gradient time", ""] + timing_lines(sections["timing"], baseline, backends) + [""]
    failures = data.get("summary", {}).get("failures")
    if failures is not None:
        lines += ["Verdict: all checks passed." if not failures else
                  "Verdict: " + "; ".join(failures) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="gpu_check.json")
    parser.add_argument("--append", default=None, help="markdown file to append the section to")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        text = markdown(json.load(f))
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
