"""Median time per provider and the ratios against `cpp`, from a pytest-benchmark JSON file.

python bench/summarize.py results.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as handle:
        data = json.load(handle)
    groups = defaultdict(dict)
    peak = None
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if bench["group"] == "peak":
            peak = info.get("gflops_per_second")
            continue
        groups[bench["group"]][info.get("provider", bench["name"])] = (bench["stats"]["median"], info)
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}; torch matmul peak: "
          f"{peak:.1f} GFLOP/s" if peak else "")
    for group, providers in groups.items():
        print(f"\n{group}")
        base = providers.get("cpp", (None,))[0]
        for provider, (median, info) in sorted(providers.items(), key=lambda item: item[1][0]):
            ratio = f"{median / base:8.1f}x cpp" if base else ""
            rate = info.get("gflops_per_second")
            extra = f"  {rate:6.1f} GFLOP/s" if rate else ""
            if provider == "compile":
                extra += f"  (compile {info.get('prepare_seconds', float('nan')):.1f} s)"
            print(f"  {provider:10s} {median * 1e3:9.3f} ms  {ratio}{extra}")


if __name__ == "__main__":
    main(sys.argv[1])
