"""bench/report.py on a synthetic run: stored results merge by benchmark, RESULTS.md keeps its
hand-written text around the generated section, and the tables carry medians and ratios."""

import json

import report


def bench(fullname, provider, workload, median, measure="train step", threads=1, **extra):
    info = dict(provider=provider, workload=workload, measure=measure, threads=threads, oracle_error=1e-7,
                prepare_seconds=0.0, **extra)
    return {"fullname": fullname, "name": fullname, "group": None, "extra_info": info, "stats": {"median": median}}


def run(benchmarks, date="2026-11-27T00:00:00"):
    return {"datetime": date, "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
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
    stored = json.loads((results / "cpu-1-threads.json").read_text())
    assert set(stored["benchmarks"]) == {"a", "b", "c", "d", "f"} and stored["benchmarks"]["b"]["median_ms"] == 0.8
    assert (results / "cpu-2-threads.json").exists()
    written = report.write_report(results, markdown)
    text = markdown.read_text()
    assert text.startswith("# Measured results\n\nHand-written notes.\n") and text.count(report.BEGIN) == 1
    assert "#### W1 sinusoid, second order: train step, 1 thread" in text
    assert "| jax | 0.800 | 4.0 |" in text and "| pymaml-cpp | 0.200 | 1.0 |" in text
    assert "#### W1 sinusoid, second order: train step, 2 threads" in text
    assert "| pymaml-func | 900 | 500 |" in text and "| pymaml-cuda | 800 (GPU 321) | 100 |" in text
    assert "Measured 2026-11-27, 2026-11-28." in text
    assert all(path.exists() for path in written) and any(p.name == "w1_scaling.png" for p in written)
    report.write_report(results, markdown)  # idempotent: the section is replaced, not appended
    assert markdown.read_text() == text
