"""The speed benchmark still runs and prints its contract lines (no timing is asserted)."""
import os
import re
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_benchmark_prints_one_ratio_line_per_path(capsys):
    import bench_pipeline

    bench_pipeline.main(["--device", "cpu", "--width", "4", "--test-images", "32", "--defense-images", "32",
                         "--train-images", "64", "--iters", "1", "--repeat", "1"])
    out = capsys.readouterr().out
    for name in ("sweep", "anp", "rnp", "train"):
        assert re.search(rf"^{name}: original-style [0-9.]+ s, ours [0-9.]+ s, ratio [0-9.]+$", out, flags=re.M), out
    # Equal work: the incremental sweep's rows are the original-style rows (uniform random masks at width 4).
    rows = re.search(r"uniform random mask values; 19 rows, largest difference from the original-style rows "
                     r"([0-9.e+-]+)\)", out)
    assert rows and float(rows.group(1)) < 1e-4, out


def test_soda_benchmark_prints_one_ratio_line_per_split(capsys):
    import bench_soda

    bench_soda.main(["--device", "cpu", "--width", "4", "--samples", "4", "--splits", "penultimate", "layer4"])
    out = capsys.readouterr().out
    for name in ("causality-penultimate", "causality-penultimate-closed-form", "causality-layer4"):
        assert re.search(rf"^{name}: original-style [0-9.]+ s, ours [0-9.]+ s, ratio [0-9.]+$", out, flags=re.M), out
