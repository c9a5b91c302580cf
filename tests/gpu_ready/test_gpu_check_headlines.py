"""gpu_check's summary reads the benchmarks' one CSV schema (benchmarks/harness.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_headlines_parse_harness_rows(tmp_path):
    harness = load("harness", ROOT / "benchmarks" / "harness.py")
    gpu_check = load("gpu_check_for_test", ROOT / "scripts" / "gpu_check.py")
    rows = [
        harness.make_row(benchmark="ops", op="sgd_step_", case="momentum=0.9", provider=p, device="cuda",
                         dtype="float32", numel=n, tensors=1, median_s=t, bytes=20 * n, roofline_gbps=3000.0)
        for p, n, t in (("cpp", 1 << 20, 1e-5), ("cpp", 1 << 24, 1.2e-4), ("triton", 1 << 24, 1.5e-4), ("torch-fused", 1 << 24, 2e-4))
    ] + [
        harness.make_row(benchmark="meta_iteration", op="meta_iteration", case="omniglot", provider=p, device="cuda",
                         dtype="float32", median_s=t, metric="meta_it_per_s", value=1 / t)
        for p, t in (("seed", 0.1), ("graph", 0.01))
    ] + [
        harness.make_row(benchmark="eval", op="evaluate", case="omniglot 5-way", provider=p, device="cuda",
                         dtype="float32", median_s=t, metric="tasks_per_s", value=1 / t, baseline_provider="sequential",
                         ratio_vs_baseline=0.25 / t)
        for p, t in (("sequential", 0.25), ("batched_8_graph", 0.005))
    ]  # fmt: skip
    harness.add_ratios(rows, "seed", keys=("benchmark", "case"))
    path = harness.write_csv(tmp_path / "benchmarks.csv", rows)
    ops = gpu_check.roofline_headline(path)
    assert ops == [
        "sgd_step_ cpp: 2796 GB/s = 0.93 of the triad roofline at numel 16777216",
        "sgd_step_ triton: 2237 GB/s = 0.75 of the triad roofline at numel 16777216",
    ]
    meta = gpu_check.meta_headline(path)
    assert meta == ["omniglot seed: 10.0 meta-it/s (x1.00 vs seed)", "omniglot graph: 100.0 meta-it/s (x10.00 vs seed)"]
    assert gpu_check.eval_headline(path) == [
        "omniglot 5-way sequential: 4.0 tasks/s (x1.00 vs sequential)",
        "omniglot 5-way batched_8_graph: 200.0 tasks/s (x50.00 vs sequential)",
    ]
