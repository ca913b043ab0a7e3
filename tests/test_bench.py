"""benchmarks/bench.py: the side-by-side timer and a short end-to-end run (no timing claims)."""

import gc
import importlib.util
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mcloss_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_side_by_side_interleaves_rounds_and_keeps_failures_apart(bench):
    calls = []

    def job(name):
        return lambda: calls.append(name)

    def failing():
        calls.append("bad")
        if calls.count("bad") > 2:  # warm-up and the sizing run pass, the first block fails
            raise RuntimeError("boom")

    timer = bench.Timer(torch.device("cpu"), warmup=1, repeats=9, budget_s=10.0, rounds=3)
    out = timer.side_by_side([("a", job("a")), ("bad", failing), ("b", job("b"))])

    assert isinstance(out["bad"], RuntimeError)
    assert gc.isenabled()  # switched off only while timing
    for key in ("a", "b"):
        median, runs, faults = out[key]
        assert runs == 9 and median >= 0 and faults >= 0
    # after the warm-up and sizing runs, a and b alternate in blocks: 1 untimed + block runs
    timed = [c for c in calls[6:] if c != "bad"]
    first_b = timed.index("b")
    assert "a" in timed[first_b:], "a's later rounds come after b's first block"
    assert calls.count("a") == 1 + 9 + 2  # warm-up, 9 timed, one untimed run per later round


def test_quick_run_writes_rows_for_every_shape(bench, tmp_path):
    out = tmp_path / "rows.json"
    rc = bench.main(["--device", "cpu", "--quick", "--impls", "fused", "softmax",
                     "--repeats", "2", "--warmup", "1", "--rounds", "2", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["impl"] for r in rows} == {"fused", "softmax"}
    assert len(rows) == 2 * len(bench.QUICK_CASES)
    for r in rows:
        assert r["error"] is None
        assert r["fwd_ms"] > 0
        if r["impl"] == "fused":
            assert r["fwd_bwd_ms"] > 0 and r["softmax_passes"] > 0
            assert r["saved_pct_of_x"] <= 2.0
