"""The speed benchmark still runs and prints its contract lines (no timing is asserted)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """``benchmarks/gpu_check.sh --device cpu --tiny`` once: the GPU check's own steps, CPU-sized."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--out", str(out), "--budget", "1800"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_gpu_check_tiny_prints_every_part_into_at_most_eight_files(gpu_check):
    files = sorted(os.listdir(gpu_check))
    assert len(files) <= 8 and {"summary.txt", "env.txt", "train.txt", "defenses.txt", "pipeline.txt",
                                "grid.txt", "table.md"} <= set(files)
    summary = (gpu_check / "summary.txt").read_text()
    for batch in (128, 512):
        for variant in ("baseline", "static"):
            assert re.search(rf"^train batch {batch} {variant}: [0-9,]+ img/s, [0-9.]+ [GT]FLOP/s = [0-9.]+ % of peak",
                             summary, flags=re.M), summary
    assert re.search(r"^anp: 2 iterations in [0-9.]+ s .* s per 2000", summary, flags=re.M), summary
    assert re.search(r"^rnp per-batch eager vs deferred: same stop True, largest weight difference 0.00e\+00",
                     summary, flags=re.M), summary
    assert re.search(r"^grid: every cell done in [0-9]+ s \(cells finished \[14/14\]\)", summary, flags=re.M), summary
    assert "stopped at its" not in summary and "exited with status" not in summary


@pytest.mark.slow
def test_benchmark_prints_one_ratio_line_per_path(gpu_check):
    """bench_pipeline.py as gpu_check.sh runs it (--width 4, 32 test and defense images, 64 training images)."""
    out = (gpu_check / "pipeline.txt").read_text()
    for name in ("sweep", "anp", "rnp", "train"):
        assert re.search(rf"^{name}: original-style [0-9.]+ s, ours [0-9.]+ s, ratio [0-9.]+$", out, flags=re.M), out
    # Equal work: the incremental sweep's rows are the original-style rows (uniform random masks at width 4).
    rows = re.search(r"uniform random mask values; 19 rows, largest difference from the original-style rows "
                     r"([0-9.e+-]+)\)", out)
    assert rows and float(rows.group(1)) < 1e-4, out


def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path):
    for argv, needle in (([], "--out"), (["--out", str(tmp_path), "--device", "tpu"], "--device"),
                         (["--out", str(tmp_path), "--budget", "soon"], "--budget"),
                         (["--out", str(tmp_path), "--fast"], "unknown argument --fast"),
                         (["--out", str(tmp_path), "--parts", "train,speed"], "--parts: unknown part speed")):
        env = {k: v for k, v in os.environ.items() if k != "OUT"}
        done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), *argv], capture_output=True,
                              text=True, env=env, cwd=ROOT)
        assert done.returncode == 2 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_soda_benchmark_prints_one_ratio_line_per_split(capsys):
    import bench_soda

    bench_soda.main(["--device", "cpu", "--width", "4", "--samples", "4", "--splits", "penultimate", "layer4"])
    out = capsys.readouterr().out
    for name in ("causality-penultimate", "causality-penultimate-closed-form", "causality-layer4"):
        assert re.search(rf"^{name}: original-style [0-9.]+ s, ours [0-9.]+ s, ratio [0-9.]+$", out, flags=re.M), out
