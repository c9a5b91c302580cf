"""The benchmark harness (benchmarks/harness.py), its plotting and report modules, and
bench_ops on tiny sizes: one schema, real byte counts, the roofline fraction."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("harness", "plot", "report", "bench_ops")}
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_rows(mods):
    return mods["bench_ops"].run(
        "cpu", rounds=2, ops=("batched_meta_update_", "task_end_"), sizes=[2000], counts=[1, 4],
        min_batch_s=0.001, log=lambda s: None,
        # Not triton: the test session runs it in its (slow) interpreter on the CPU.
        # torch.optim's first optimizer imports torch._dynamo (seconds): no sgd/adam cases here.
        providers=("reference", "cpp", "torch", "torch-foreach", "seed loop"),
    )  # fmt: skip


def test_bytes_are_what_each_op_reads_plus_writes(mods):
    h, P = mods["harness"], 1000
    assert h.bytes_moved("batched_meta_update_", P, n=5, write_back=True) == (2 * 5 + 2) * 4 * P
    assert h.bytes_moved("batched_meta_update_", P, n=5, write_back=False) == (5 + 2) * 4 * P
    assert h.bytes_moved("sgd_step_", P) == 5 * 4 * P
    assert h.bytes_moved("sgd_step_", P, momentum=False) == 3 * 4 * P
    assert h.bytes_moved("adam_step_", P) == 7 * 4 * P
    assert h.bytes_moved("adam_step_", P, amsgrad=True) == 9 * 4 * P
    # 16-bit params keep a float32 accumulator.
    assert h.bytes_moved("task_end_", P, torch.bfloat16) == (3 * 2 + 2 * 4) * P
    assert h.bytes_moved("meta_update_", P, torch.bfloat16) == (2 * 2 + 2 * 4) * P
    # First-order MAML: the steps also write their update (opmath), task_end_ reads it instead of the param.
    assert h.bytes_moved("sgd_step_", P, torch.bfloat16, update=True) == (5 * 2 + 4) * P
    assert h.bytes_moved("adam_step_", P, update=True) == 8 * 4 * P
    assert h.bytes_moved("task_end_", P, torch.bfloat16, update=True) == (2 * 2 + 3 * 4) * P


def test_timer_interleaves_and_rotates(mods):
    order = []
    timer = mods["harness"].Timer("cpu", rounds=3)
    out = timer.samples({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, calls=1)
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3}
    assert order == ["a", "b", "b", "a", "a", "b"]


def test_rows_have_one_schema_and_the_roofline_fraction_of_real_bytes(mods, tiny_rows):
    h = mods["harness"]
    assert all(tuple(r) == h.SCHEMA for r in tiny_rows)
    timed = [r for r in tiny_rows if r["benchmark"] == "ops" and r["median_s"] != ""]
    assert {"reference", "torch", "torch-foreach", "seed loop"} <= {r["provider"] for r in timed}
    for r in timed:
        gbps = int(r["bytes"]) / float(r["median_s"]) / 1e9
        assert float(r["gbps"]) == pytest.approx(gbps, rel=1e-4)
        assert float(r["roofline_fraction"]) == pytest.approx(gbps / float(r["roofline_gbps"]), rel=1e-3)
        if r["op"] == "batched_meta_update_":
            n_row = 2 * 5 + 2 if r["case"].endswith("write_back=True") else 5 + 2
            assert int(r["bytes"]) == n_row * 4 * 2000
            assert r["baseline_provider"] == "torch"
        else:
            assert int(r["bytes"]) == (3 + 2) * 4 * 2000 and r["baseline_provider"] == "torch-foreach"
    assert {r["op"] for r in tiny_rows if r["benchmark"] == "roofline"} == {h.TRIAD, h.COPY, h.AXPY}
    # A provider that cannot run here is named with the reason, for a "not measured" row.
    ok, missing = mods["bench_ops"].available("cpu", ("reference", "no-such-backend"))
    assert list(ok) == ["reference"] and "unknown backend" in missing["no-such-backend"]


def test_csv_merge_plot_and_page(mods, tiny_rows, tmp_path):
    h, plot, report = mods["harness"], mods["plot"], mods["report"]
    other = h.make_row(benchmark="distributed", op="meta_step", case="2 process(es)", provider="gloo",
                       numel=10, median_s=0.001)  # fmt: skip
    path = h.write_csv(tmp_path / "b.csv", [other])
    h.write_csv(path, tiny_rows)
    h.write_csv(path, tiny_rows)  # the same identities: replaced, not appended
    back = h.read_csv(path)
    assert len(back) == len(tiny_rows) + 1
    png = plot.plot_ops(back, tmp_path / "ops.png", "tiny")
    assert png.read_bytes()[:4] == b"\x89PNG"
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# x\n\n## Benchmarks\n\n{report.BEGIN}\nSTALE-BLOCK\n{report.END}\n\n## Layout\nkept\n")
    report.update_page(page, back)
    text = page.read_text()
    assert "STALE-BLOCK" not in text and text.endswith("## Layout\nkept\n")
    assert "roofline fraction" in text and "GPU" in text and "not measured" in text


def test_the_benchmarks_page_holds_the_generated_block(mods):
    """`make bench` rewrites docs/benchmarks.md between the markers: they must be there, once."""
    report = mods["report"]
    text = (BENCH.parent / "docs" / "benchmarks.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert text.index(report.BEGIN) < text.index(report.END)


def test_optimizer_mode_rows_and_report(mods):
    """bench_ops --optimizer: whole Adam steps, one row per variant, ratios against torch-fused,
    rendered with the issue-22 targets."""
    rows = mods["bench_ops"].run_optimizer("cpu", rounds=2, sizes=[2000], count=4, log=lambda s: None)
    names = {r["provider"] for r in rows}
    assert {"torch-fused", "torch-forloop", "ReptileOptimizer cpp fused=True", "ReptileOptimizer cpp"} <= names or (
        "cpp" not in mods["bench_ops"].available("cpu")[0]
    )
    assert all(r["benchmark"] == "optimizer" and r["baseline_provider"] == "torch-fused" for r in rows)
    assert all(float(r["bytes"]) == mods["harness"].bytes_moved("adam_step_", 2000, amsgrad="True" in r["case"])
               for r in rows)  # fmt: skip
    text = mods["report"].optimizer_markdown(rows, mods["harness"].environment())
    assert "ReptileOptimizer" in text and "torch-fused" in text


def test_report_shows_the_newest_machine_per_table(mods):
    report = mods["report"]
    old = dict(benchmark="ops", device="cpu", threads="1", dtype="float32", machine="old box", date="2026-01-01",
               case="", op="sgd_step_")  # fmt: skip
    new = dict(old, machine="new box", date="2026-02-01")
    other = dict(old, dtype="bfloat16")  # only measured on the old machine: kept
    stream = dict(old, benchmark="roofline", case="sgd_step_, bfloat16")  # the STREAM rows of that bf16 run
    kept = report.latest([old, new, other, stream])
    assert kept == [new, other, stream]
