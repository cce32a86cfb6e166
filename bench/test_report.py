"""bench/report.py on a synthetic run: stored results merge by benchmark, RESULTS.md keeps its
hand-written text around the generated section, and the tables carry medians and ratios."""

import json

import report


def bench(fullname, provider, workload, median, measure="train step", threads=1, **extra):
    info = dict(provider=provider, workload=workload, measure=measure, threads=threads, oracle_error=1e-7,
                prepare_seconds=0.0, **extra)
    return {"fullname": fullname, "name": fullname, "group": None, "extra_info": info, "stats": {"median": median}}


def run(benchmarks, date="2026-11-27T00:00:00"):
    return {"datetime": date, "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2, "family": 25},
                                               "pymaml_cpu_level": "x86-64-v3"},
            "benchmarks": benchmarks}


def test_report_merges_runs_and_rewrites_only_its_section(tmp_path):
    results, markdown = tmp_path / "results", tmp_path / "RESULTS.md"
    markdown.write_text("# Measured results\n\nHand-written notes.\n")
    first = [bench("a", "pymaml-cpp", "W1 sinusoid S=1 second order", 0.0002),
             bench("b", "jax", "W1 sinusoid S=1 second order", 0.0006),
             bench("c", "pymaml-cpp", "W1 sinusoid T=100 width=40 S=1 second order", 0.0008),
             bench("d", "pymaml-func", "Conv4 meta-step memory S=5 second order", 0.0, measure="peak memory",
                   peak_rss_mb=900.0, setup_rss_mb=400.0),
             bench("f", "pymaml-cuda", "Conv4 meta-step memory S=5 second order", 0.0, measure="peak memory",
                   peak_rss_mb=800.0, setup_rss_mb=700.0, gpu_peak_mb=321.0),
             bench("e", "pymaml-cpp", "W1 sinusoid S=1 second order", 0.0003, threads=2)]
    report.record_run(run(first), {"torch": "2.13.0"}, results)
    report.record_run(run([bench("b", "jax", "W1 sinusoid S=1 second order", 0.0008)], "2026-11-28T00:00:00"),
                      {"torch": "2.13.0"}, results)
    machine_file = "test_cpu_family_25_x86_64_v3"
    stored = json.loads((results / f"cpu-1-threads-{machine_file}.json").read_text())
    assert set(stored["benchmarks"]) == {"a", "b", "c", "d", "f"} and stored["benchmarks"]["b"]["median_ms"] == 0.8
    assert (results / f"cpu-2-threads-{machine_file}.json").exists()
    written = report.write_report(results, markdown)
    text = markdown.read_text()
    assert text.startswith("# Measured results\n\nHand-written notes.\n") and text.count(report.BEGIN) == 1
    assert "#### W1 sinusoid, second order: train step, 1 thread" in text
    assert "| jax | 0.800 | 4.0 |" in text and "| pymaml-cpp | 0.200 | 1.0 |" in text
    assert "#### W1 sinusoid, second order: train step, 2 threads" in text
    assert "| pymaml-func | 900 | 500 |" in text and "| pymaml-cuda | 800 (GPU 321) | 100 |" in text
    assert "Measured 2026-11-27, 2026-11-28." in text
    assert all(path.exists() for path in written) and any(p.name == f"{machine_file}_w1_scaling.png" for p in written)
    report.write_report(results, markdown)  # idempotent: the section is replaced, not appended
    assert markdown.read_text() == text


def test_runs_on_two_machines_stay_apart(tmp_path):
    results, markdown = tmp_path / "results", tmp_path / "RESULTS.md"
    zen5 = {"cpu": {"brand_raw": "AMD EPYC", "count": 2, "family": 26}, "pymaml_cpu_level": "x86-64-v4"}
    zen3 = {"cpu": {"brand_raw": "AMD EPYC", "count": 2, "family": 25}, "pymaml_cpu_level": "x86-64-v3"}
    for machine, median in ((zen5, 0.0002), (zen3, 0.0005)):
        output = dict(run([bench("a", "pymaml-cpp", "W1 sinusoid S=1 second order", median)]), machine_info=machine)
        report.record_run(output, {"torch": "2.13.0"}, results)
    assert sorted(p.name for p in results.glob("*.json")) == [
        "cpu-1-threads-amd_epyc_family_25_x86_64_v3.json", "cpu-1-threads-amd_epyc_family_26_x86_64_v4.json"]
    report.write_report(results, markdown)
    text = markdown.read_text()
    zen3_part = text.index("### AMD EPYC (family 25), 2 cores, best CPU level x86-64-v3")
    zen5_part = text.index("### AMD EPYC (family 26), 2 cores, best CPU level x86-64-v4")
    assert text.index("| pymaml-cpp | 0.500 | 1.0 |", zen3_part) < zen5_part < text.index("| pymaml-cpp | 0.200 | 1.0 |")


def test_cpu_levels_get_a_table_each_with_their_own_ratios(tmp_path):
    results, markdown = tmp_path / "results", tmp_path / "RESULTS.md"
    workload = "W1 sinusoid S=1 second order"
    runs = [bench("v3", "cpp@x86-64-v3", workload, 0.0004, measure="meta-gradient"),
            bench("base", "cpp@baseline", workload, 0.0008, measure="meta-gradient"),
            bench("compile", "compile", workload, 0.0016, measure="meta-gradient")]
    report.record_run(run(runs), {}, results)
    report.write_report(results, markdown)
    text = markdown.read_text()
    v3 = text.index("#### W1 sinusoid, second order, cpp at x86-64-v3: meta-gradient, 1 thread")
    baseline = text.index("#### W1 sinusoid, second order, cpp at baseline: meta-gradient, 1 thread")
    assert v3 < baseline
    v3_table, baseline_table = text[v3:baseline], text[baseline:]
    assert "| compile | 1.600 | 4.0 |" in v3_table and "cpp@baseline" not in v3_table
    assert "| compile | 1.600 | 2.0 |" in baseline_table and "cpp@x86-64-v3" not in baseline_table.split("####")[1]
