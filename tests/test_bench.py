"""benchmarks/bench.py: the side-by-side timer, a short end-to-end run (no timing claims), and
what its rows rest on: the published baselines of published_formulation.py, uneven groups
included, and the saved-bytes probe of helpers.py."""

import gc
import importlib.util
import json
import os
import sys

import pytest
import torch

import mcloss_cuda as mc
from helpers import counts_of, group_bounds, saved_for_backward, separated_features
from published_formulation import (
    ccmp_padded_gather,
    ccmp_published,
    host_mask_published,
    published_mc_loss,
)

BENCH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench.py"
)


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
    argv = "--device cpu --quick --impls fused softmax --repeats 2 --warmup 1 --rounds 2"
    rc = bench.main(argv.split() + ["--json", str(out)])
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


def test_padded_gather_is_the_published_ccmp_and_the_package_s_on_uneven_groups():
    x = torch.randn(3, 12, 4, 5, dtype=torch.float64)
    assert torch.equal(ccmp_padded_gather([3] * 4)(x), ccmp_published(x, 3))
    counts = counts_of(5, None, 12)  # 3, 3, 2, 2, 2
    assert torch.equal(ccmp_padded_gather(counts)(x), mc.reference.ccmp(x, counts))


def test_published_loss_on_uneven_groups_is_the_package_s():
    # bench.py's eager row on uneven groups: our adaptation must compute the same loss, in
    # float64 to the last few bits, and the same gradient
    counts = [2, 4, 3, 1]
    B, H, W = 3, 4, 5
    x = separated_features(B, counts, H, W, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, len(counts), (B,))
    mask = mc.random_channel_mask(len(counts), counts, batch=B)
    ref = mc.reference.mc_loss(x, y, len(counts), counts, mask=mask)
    out = published_mc_loss(x, y, counts, mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, x)[0],
        torch.autograd.grad(ref.loss, x)[0],
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("counts", [[3] * 4, [2, 5, 1, 4]], ids=["uniform", "uneven"])
def test_host_mask_drops_half_of_every_group_for_the_whole_batch(counts):
    m = host_mask_published(6, counts)
    assert m.shape == (6, sum(counts), 1, 1) and m.dtype == torch.float32
    assert torch.equal(m, m[:1].expand_as(m))  # one draw shared by the batch, as published
    bounds = group_bounds(counts)
    for i, n in enumerate(counts):
        assert int(m[0, bounds[i] : bounds[i + 1]].sum()) == n - n // 2


def test_saved_bytes_count_each_storage_once_and_leave_x_out():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    # x * w saves x and w; w saved twice (two products) is still one storage
    saved = saved_for_backward(lambda: (x * w).sum() + (x * w).sum(), x)
    assert saved.saw_x and saved.nbytes == w.untyped_storage().nbytes()
    assert saved.shapes == [(4, 8), (4, 8)] and saved.out.requires_grad
    # a view of x shares x's storage: not counted either
    saved = saved_for_backward(lambda: (x[:2] * w[:2]).sum(), x)
    assert saved.saw_x and saved.nbytes == w.untyped_storage().nbytes()
    assert saved_for_backward(lambda: x.sum(), x).nbytes == 0
