"""The sub-layer benchmarks' --quick modes run on the CPU and write the JSON that RESULTS.md
and its readers rely on, so that the benchmark scripts cannot rot unnoticed. (--quick skips
torch.compile: a few seconds each.) The run-all entry point (python -m benchmarks) and the
report generator run on temporary directories: no test writes to benchmarks/results or
benchmarks/RESULTS.md."""

import argparse
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `pytest` (not `python -m pytest`) does not put the root on sys.path
    sys.path.insert(0, REPO_ROOT)

from benchmarks import bench_block, bench_hc, bench_mhc, bench_streams, report, run_all  # noqa: E402

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


def _check_speedup(r, base, cand="hcext", timings="timings"):
    """The recorded speed-up is the ratio of the recorded timings (median and min), a finite number."""
    t = r[timings]
    for stat, suffix in (("median_ms", ""), ("min_ms", "_min")):
        key = f"speedup_vs_{base}{suffix}"
        if key in r:
            assert math.isfinite(r[key]) and r[key] == pytest.approx(t[base][stat] / t[cand][stat], rel=1e-12), key


def _check_checked(check):
    """What was timed was checked against hcext.reference before timing (benchmarks/bench_mhc.py:
    check_against_reference): the float64 reference, the suite's table, and the largest error
    a fraction (<= 1) of the allowed one."""
    assert check["reference"] == "hcext.reference in float64", check
    assert "TOLERANCES" in check["rule"] or "twice" in check["rule"], check
    assert 0 <= check["worst"] <= 1 and math.isfinite(check["worst"]), check


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
        assert "speedup_vs_eager" in r and "speedup_vs_eager_min" in r
        _check_speedup(r, "eager")
        _check_checked(r["check"])  # outputs and, in fwd+bwd, every gradient
        assert "speedup_vs_compiled" not in r and "speedup_vs_liger" not in r
        T, n, C = r["tokens"], r["n"], r["C"]
        assert r["bytes_must_move"] == bench_mhc.bytes_must_move(T, n, C, 4, r["mode"])
        assert r["copy_bytes"] == 2 * T * n * C * 4
        for key in ("bandwidth", "bandwidth_two_pass", "bandwidth_vs_clone"):
            _check_bandwidth(r[key])
    # The Liger-Kernel variant is GPU only: on the CPU it is skipped, with the reason recorded.
    assert "liger" not in data["config"]["variants"] and data["config"]["liger"]["skipped"]
    ops_row = rows[2]
    _check_timings(ops_row["timings"], {"aggregate", "mix_expand", "copy"})
    assert set(ops_row["check"]) == {"aggregate", "mix_expand"}
    for check in ops_row["check"].values():
        _check_checked(check)
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
        assert "speedup_vs_eager" in r
        _check_speedup(r, "eager")
        _check_speedup(r, "package")
        _check_checked(r["check"])
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
    assert row["speedup_hcext_vs_ref"] == pytest.approx(row["median_ms"]["ref_mhc"] / row["median_ms"]["hcext_mhc"],
                                                        rel=1e-12)
    for name in ("hcext_mhc", "ref_mhc"):
        assert row["overhead_vs_residual"][name] == pytest.approx(
            row["median_ms"][name] / row["median_ms"]["residual"] - 1, rel=1e-12, abs=1e-12)
    _check_checked(row["check"])  # the hcext block against the reference block, output and every gradient


def test_bench_streams_quick(tmp_path):
    data = _run(bench_streams.main, tmp_path, "streams")
    _check_common(data, "streams")
    rows = data["results"]
    assert [(r["op"], r["mode"]) for r in rows] == [
        ("aggregate", "fwd"), ("aggregate", "fwd+bwd"), ("mix_expand", "fwd"), ("mix_expand", "fwd+bwd")
    ]
    for r in rows:
        assert (r["tokens"], r["n"], r["C"], r["dtype"]) == (64, 4, 64, "float32")
        _check_timings(r["timings"], {"hcext", "eager", "copy"})
        assert "speedup_vs_eager" in r and "speedup_vs_eager_min" in r and "speedup_vs_compiled" not in r
        _check_speedup(r, "eager")
        _check_checked(r["check"])
        # checked against the reference before timing
        assert 0 <= r["max_rel_diff_vs_reference"] <= bench_streams.CHECK_TOL["float32"]
        assert r["bytes_must_move"] == bench_streams.bytes_must_move(64, 4, 64, 4, r["op"], r["mode"])
        assert r["copy_bytes"] == 2 * 64 * 4 * 64 * 4
        _check_bandwidth(r["bandwidth"])


def test_bench_streams_bytes_must_move():
    # Per token, in elements of x: aggregate fwd (n + 1) C, fwd+bwd (3n + 2) C; mix_expand fwd
    # (2n + 1) C, fwd+bwd (5n + 3) C; n = 4, C = 10, fp32.
    assert bench_streams.bytes_must_move(1, 4, 10, 4, "aggregate", "fwd") == 5 * 10 * 4
    assert bench_streams.bytes_must_move(1, 4, 10, 4, "aggregate", "fwd+bwd") == 14 * 10 * 4
    assert bench_streams.bytes_must_move(1, 4, 10, 4, "mix_expand", "fwd") == 9 * 10 * 4
    assert bench_streams.bytes_must_move(3, 4, 10, 2, "mix_expand", "fwd+bwd") == 3 * 23 * 10 * 2


# ---------------------------------------------------------------------------------------
# python -m benchmarks (run_all) and the report


def _regions(text):
    return {m["id"]: m["body"] for m in report.REGION.finditer(text)}


def _table_rows(body, header_start):
    """The data rows of the table in body whose header line starts with header_start."""
    lines = body.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return lines[i], rows


def _mtimes(paths):
    return {p: os.path.getmtime(p) if os.path.exists(p) else None for p in paths}


def test_run_all_quick(tmp_path):
    threads = torch.get_num_threads()
    names = list(run_all.discover())
    assert names[:5] == ["sinkhorn", "mhc", "hc", "block", "streams"]
    ids = {name: run_all.output_name(name, "cpu", threads)[: -len(".json")] for name in names}
    # The committed files of the same names, and the report: untouched by a run elsewhere.
    committed = [os.path.join(report.RESULTS_DIR, f"{rid}.json") for rid in ids.values()] + [report.RESULTS_MD]
    before = _mtimes(committed)
    doc = tmp_path / "RESULTS.md"
    argv = ["--quick", "--threads", str(threads), "--results-dir", str(tmp_path), "--report", str(doc), "--no-charts"]
    assert run_all.main(argv) == 0
    assert _mtimes(committed) == before
    data = {}
    for name, rid in ids.items():
        with open(tmp_path / f"{rid}.json") as f:
            data[name] = json.load(f)
        assert data[name]["config"]["quick"] is True and data[name]["metadata"]["threads"] == threads

    # Every benchmark checked what it timed (or measured) against the reference first.
    for name in ("sinkhorn", "mhc", "hc", "boundary", "streams"):
        for r in data[name]["results"]:
            if name == "streams":
                assert 0 <= r["max_rel_diff_vs_reference"] <= bench_streams.CHECK_TOL[r["dtype"]]
                continue
            checks = r["check"] if "worst" not in r["check"] else {"": r["check"]}
            assert checks and (name != "boundary" or set(checks) == {"fused", "unfused"}), (name, r["check"])
            for check in checks.values():
                _check_checked(check)
    for r in data["block"]["results"]:
        _check_checked(r["check"])
    assert set(data["memory"]["summary"]["check"]) == {"mhc", "mhc_recompute"}
    for check in data["memory"]["summary"]["check"].values():
        _check_checked(check)

    regions = _regions(doc.read_text())
    assert set(regions) == {"runs", *ids.values()}
    for rid in ids.values():
        assert f"[`{rid}`]({rid}.json) (--quick)" in regions["runs"]
        assert "--quick smoke run" in regions[rid] and "pip install matplotlib" in regions[rid]

    header, rows = _table_rows(regions[ids["sinkhorn"]], "| T | n |")
    assert header == "| T | n | mode | hcext ms | eager ms | hcext vs eager |"
    assert [r.split(" | ")[:3] for r in rows] == [["| 64", "4", "fwd"], ["| 64", "4", "fwd+bwd"]]

    header, rows = _table_rows(regions[ids["mhc"]], "| T | C | dtype | mode |")
    assert header == ("| T | C | dtype | mode | hcext ms | eager ms | copy ms | clone ms | hcext vs eager | "
                      "hcext GB/s | copy GB/s | of copy | of copy (x read per op) |")
    assert [r.split(" | ")[3] for r in rows] == ["fwd", "fwd+bwd"] and all(r.startswith("| 64 | 64 | float32 |") for r in rows)
    speedup = data["mhc"]["results"][1]["speedup_vs_eager"]
    assert rows[1].split(" | ")[8].startswith(f"{speedup:.1f}x (")  # the JSON's number, formatted
    header, rows = _table_rows(regions[ids["mhc"]], "| T | C | dtype | aggregate ms |")
    assert len(rows) == 1 and header.endswith("| copy ms | copy GB/s |")

    has_package = "package" in data["hc"]["config"]["variants"]
    header, rows = _table_rows(regions[ids["hc"]], "| kind |")
    assert header.startswith("| kind | T | C | dtype | mode | hcext ms | eager ms |")
    assert ("hcext vs package" in header) == has_package
    assert [tuple(r.split(" | ")[i] for i in (0, 4)) for r in rows] == [
        ("| dynamic", "fwd"), ("| dynamic", "fwd+bwd"), ("| static", "fwd"), ("| static", "fwd+bwd")
    ]

    header, rows = _table_rows(regions[ids["block"]], "| tokens |")
    assert header.startswith("| tokens | dim | n | dtype | residual ms | hcext_mhc ms | ref_mhc ms | hcext vs reference mHC |")
    assert len(rows) == 1 and rows[0].startswith("| 256 | 64 | 4 | float32 |")

    header, rows = _table_rows(regions[ids["streams"]], "| T | C | dtype | op |")
    assert header == ("| T | C | dtype | op | mode | hcext ms | eager ms | copy ms | hcext vs eager | MB moved | "
                      "hcext GB/s | copy GB/s | of copy |")
    assert [tuple(r.split(" | ")[3:5]) for r in rows] == [
        ("aggregate", "fwd"), ("aggregate", "fwd+bwd"), ("mix_expand", "fwd"), ("mix_expand", "fwd+bwd")
    ]


def test_run_all_options():
    """Only the options a benchmark's argparse accepts are passed; the JSON names follow the
    results' naming (mhc-cpu.json, mhc-cpu-1thread.json)."""
    benches = run_all.discover()
    block = run_all.accepted_options(benches["block"])
    assert {"--quick", "--threads", "--out"} <= block and "--no-compile" not in block
    assert "--no-compile" in run_all.accepted_options(benches["mhc"])

    args = argparse.Namespace(device="cpu", threads=1, quick=False, no_compile=True, repeats=None, warmup=None)
    argv, _ = run_all.bench_argv("block", block, args, "/r")
    assert argv == ["--device", "cpu", "--threads", "1", "--out", f"/r/{run_all.output_name('block', 'cpu', 1)}"]
    argv, _ = run_all.bench_argv("x", {"--out"}, args, "/r")  # no --device: fine on the CPU
    assert argv == ["--out", f"/r/{run_all.output_name('x', 'cpu', 1)}"]
    args.device, args.quick = "cuda", True
    assert run_all.bench_argv("x", {"--out", "--quick"}, args, "/r")[0] is None  # CPU only
    assert run_all.bench_argv("x", {"--out", "--device"}, args, "/r")[0] is None  # no quick mode
    assert run_all.bench_argv("x", {"--device", "--quick"}, args, "/r")[0] is None  # no --out

    cpus = os.cpu_count()
    assert run_all.output_name("mhc", "cpu", None) == "mhc-cpu.json" == run_all.output_name("mhc", "cpu", cpus)
    assert run_all.output_name("mhc", "cuda", 1) == "mhc-cuda.json"
    if cpus != 1:
        assert run_all.output_name("mhc", "cpu", 1) == "mhc-cpu-1thread.json"


def _outside_regions(text):
    return report.REGION.sub(lambda m: report.wrap(m["id"], ""), text)


def test_report_keeps_prose():
    """Regenerating RESULTS.md from the committed JSONs: every marked region is rebuilt, the
    hand-written text around them stays byte for byte, and the committed file is what the JSONs
    give (else: run python -m benchmarks.report)."""
    with open(report.RESULTS_MD) as f:
        original = f.read()
    results = report.load_results(report.RESULTS_DIR)
    ids = [m["id"] for m in report.REGION.finditer(original)]
    assert "runs" in ids and set(results) <= set(ids)  # every JSON has its place in the prose
    stale = report.REGION.sub(lambda m: report.wrap(m["id"], "stale"), original)
    regenerated = report.render_document(stale, results, report.RESULTS_DIR, report.RESULTS_MD)
    assert [m["id"] for m in report.REGION.finditer(regenerated)] == ids
    assert _outside_regions(regenerated) == _outside_regions(original)
    assert "stale" not in "".join(_regions(regenerated).values())
    assert regenerated == original, "benchmarks/RESULTS.md is out of date: python -m benchmarks.report"

    with open(report.README) as f:
        readme = f.read()
    assert "summary" in _regions(readme)
    assert report.render_readme(readme, results, report.README, report.RESULTS_MD) == readme, (
        "README.md's benchmark summary is out of date: python -m benchmarks.report")


def test_report_new_and_missing_regions(tmp_path):
    """A JSON of a benchmark the report does not know (a new bench_*.py) gets a generic table in
    a new section; a region without its JSON says how to produce it; the prose stays."""
    meta = {"date": "2026-01-02T03:04:05+00:00", "device": "cpu", "device_name": "CPU", "threads": 1,
            "torch_version": "2.x", "git_commit": "0123456789abcdef"}
    rows = [{"tokens": 64, "mode": "fwd", "timings": {"hcext": {"median_ms": 1.0, "min_ms": 0.9},
                                                    "eager": {"median_ms": 3.0, "min_ms": 2.0}},
             "speedup_vs_eager": 3.0, "speedup_vs_eager_min": 2.2}]
    with open(tmp_path / "memory-cpu.json", "w") as f:
        json.dump({"metadata": meta, "config": {"benchmark": "memory"}, "results": rows}, f)
    doc = tmp_path / "RESULTS.md"
    prose = "# Results\n\nHand-written.\n\n" + report.wrap("mhc-cuda", "old") + "\n\nMore prose.\n"
    doc.write_text(prose)
    assert report.main(["--results-dir", str(tmp_path), "--no-charts"]) == 0
    text = doc.read_text()
    assert text.startswith("# Results\n\nHand-written.\n\n") and "\n\nMore prose.\n" in text
    regions = _regions(text)
    assert "`mhc-cuda.json` does not exist" in regions["mhc-cuda"] and "--device cuda" in regions["mhc-cuda"]
    assert "## memory: `memory-cpu`" in text
    header, table = _table_rows(regions["memory-cpu"], "| tokens |")
    assert header == "| tokens | mode | hcext ms | eager ms | hcext vs eager |"
    assert table == ["| 64 | fwd | 1.00 (0.900) | 3.00 (2.00) | 3.0x (2.2x) |"]
    assert "0123456 | 2026-01-02 03:04 UTC" in regions["runs"]
    report.main(["--results-dir", str(tmp_path), "--no-charts"])
    assert doc.read_text() == text  # idempotent


def test_report_charts(tmp_path):
    """With matplotlib: one speed-up PNG per JSON (and a bandwidth PNG for GPU runs), linked
    from its region."""
    pytest.importorskip("matplotlib")
    for name in ("sinkhorn-cpu-1thread", "mhc-cpu"):
        with open(os.path.join(report.RESULTS_DIR, f"{name}.json")) as f:
            data = json.load(f)
        if name == "mhc-cpu":  # stands in for a GPU run
            data["metadata"]["device"], name = "cuda", "mhc-cuda"
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump(data, f)
    assert report.main(["--results-dir", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["mhc-cuda-bandwidth.png", "mhc-cuda-speedup.png", "sinkhorn-cpu-1thread-speedup.png"]
    regions = _regions((tmp_path / "RESULTS.md").read_text())
    assert "![mhc-cuda-bandwidth](mhc-cuda-bandwidth.png)" in regions["mhc-cuda"]
    assert "![sinkhorn-cpu-1thread-speedup](sinkhorn-cpu-1thread-speedup.png)" in regions["sinkhorn-cpu-1thread"]
