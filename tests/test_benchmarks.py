"""The sub-layer benchmarks' --quick modes run on the CPU and write the JSON that RESULTS.md
and its readers rely on, so that the benchmark scripts cannot rot unnoticed. (--quick skips
torch.compile: a few seconds each.)"""

import importlib.util
import json
import math
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `pytest` (not `python -m pytest`) does not put the root on sys.path
    sys.path.insert(0, REPO_ROOT)

from benchmarks import bench_block, bench_hc, bench_mhc  # noqa: E402

TIMING_KEYS = {"min_ms", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "repeats", "inner"}
BANDWIDTH_KEYS = {"gbps", "copy_gbps", "fraction_of_copy", "gbps_min", "copy_gbps_min", "fraction_of_copy_min"}


def _run(main, tmp_path, name):
    out = tmp_path / f"{name}.json"
    # Keep this process's thread count: the benchmark would otherwise set os.cpu_count().
    main(["--quick", "--threads", str(torch.get_num_threads()), "--out", str(out)])
    with open(out) as f:
        return json.load(f)


def _check_timings(timings, variants):
    assert set(timings) == set(variants)
    for t in timings.values():
        assert TIMING_KEYS <= set(t)
        assert t["repeats"] == 2
        assert 0 < t["min_ms"] <= t["median_ms"] and math.isfinite(t["median_ms"])


def _check_bandwidth(bw):
    assert BANDWIDTH_KEYS <= set(bw)
    assert all(v > 0 and math.isfinite(v) for v in bw.values())


def _check_common(data, benchmark):
    assert set(data) == {"metadata", "config", "results"}
    meta = data["metadata"]
    for key in ("date", "device", "device_name", "torch_version", "hcext_build_info", "threads"):
        assert key in meta
    assert meta["device"] == "cpu"
    assert data["config"]["benchmark"] == benchmark and data["config"]["quick"] is True
    assert "compiled" not in data["config"]["variants"]


def test_bench_mhc_quick(tmp_path):
    data = _run(bench_mhc.main, tmp_path, "mhc")
    _check_common(data, "mhc")
    rows = data["results"]
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd", "ops"]
    for r in rows:
        assert {"tokens", "n", "C", "dtype", "mode", "timings", "copy_bytes", "bandwidth"} <= set(r)
        assert (r["n"], r["dtype"]) == (4, "float32")
    for r in rows[:2]:
        _check_timings(r["timings"], {"hcext", "eager", "copy", "clone"})
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_eager_min"] > 0
        assert "speedup_vs_compiled" not in r
        T, n, C = r["tokens"], r["n"], r["C"]
        assert r["bytes_must_move"] == bench_mhc.bytes_must_move(T, n, C, 4, r["mode"])
        assert r["copy_bytes"] == 2 * T * n * C * 4
        for key in ("bandwidth", "bandwidth_two_pass", "bandwidth_vs_clone"):
            _check_bandwidth(r[key])
    ops_row = rows[2]
    _check_timings(ops_row["timings"], {"aggregate", "mix_expand", "copy"})
    assert set(ops_row["bandwidth"]) == {"aggregate", "mix_expand"}
    for bw in ops_row["bandwidth"].values():
        _check_bandwidth(bw)


def test_bytes_must_move():
    # Per token, in elements of x: fwd (2n + 2) C, fwd+bwd (5n + 5) C; n = 4, C = 10, fp32.
    assert bench_mhc.bytes_must_move(1, 4, 10, 4, "fwd") == 10 * 10 * 4
    assert bench_mhc.bytes_must_move(1, 4, 10, 4, "fwd+bwd") == 25 * 10 * 4
    assert bench_mhc.bytes_must_move(3, 4, 10, 2, "fwd", two_pass=True) == 3 * 14 * 10 * 2


def test_bench_hc_quick(tmp_path):
    data = _run(bench_hc.main, tmp_path, "hc")
    _check_common(data, "hc")
    has_package = importlib.util.find_spec("hyper_connections") is not None
    assert ("package" in data["config"]["variants"]) == has_package
    rows = data["results"]
    assert [(r["kind"], r["mode"]) for r in rows] == [
        ("dynamic", "fwd"), ("dynamic", "fwd+bwd"), ("static", "fwd"), ("static", "fwd+bwd")
    ]
    for r in rows:
        package = has_package and r["kind"] == "dynamic"
        _check_timings(r["timings"], {"hcext", "eager", "copy"} | ({"package"} if package else set()))
        assert r["speedup_vs_eager"] > 0
        assert ("speedup_vs_package" in r) == package
        assert r["bytes_must_move"] == bench_mhc.bytes_must_move(r["tokens"], r["n"], r["C"], 4, r["mode"])
        _check_bandwidth(r["bandwidth"])
    if has_package:
        # The package module is set up as the same sub-layer: in fp32 it differs from hcext only
        # by its norm's epsilon and the order of operations.
        assert rows[0]["package_max_abs_diff_fp32"] < 1e-3


def test_bench_block_quick(tmp_path):
    data = _run(bench_block.main, tmp_path, "block")
    assert set(data) == {"metadata", "config", "results"}
    assert data["metadata"]["device"] == "cpu" and data["config"] == {"benchmark": "block", "quick": True}
    (row,) = data["results"]
    variants = {"residual", "hcext_mhc", "ref_mhc"}
    assert set(row["median_ms"]) == variants and set(row["overhead_vs_residual"]) == {"hcext_mhc", "ref_mhc"}
    assert all(len(v) == 2 and min(v) > 0 for v in row["timings_ms"].values())
    assert row["speedup_hcext_vs_ref"] > 0
