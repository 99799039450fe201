"""PNG charts for benchmarks/report.py: grouped bar charts of hcext's speed-ups and, for GPU
runs, of the achieved bandwidth as a fraction of the copy's.

matplotlib is optional (no dependency of hcext): ``available()`` says whether it can be
imported, and the report writes its tables either way.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.tables import benchmark_of, variants


def available() -> bool:
    try:
        import matplotlib  # noqa: F401  (only: is it there?)
    except ImportError:
        return False
    return True


def grouped_bars(
    path: str,
    title: str,
    labels: Sequence[str],
    series: Dict[str, List[Optional[float]]],
    ylabel: str,
    hlines: Sequence[Tuple[float, str]] = (),
    log: Optional[bool] = None,
) -> str:
    """One group of bars per label, one bar per series (None: no bar); writes a PNG to path.

    log: logarithmic y axis; None picks it when the values span more than 20x (Sinkhorn's
    speed-ups over the compiled reference reach thousands).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    values = [v for vs in series.values() for v in vs if v is not None and v > 0]
    if log is None:
        log = bool(values) and max(values) / min(values) > 20
    width = 0.8 / max(1, len(series))
    bars = len(labels) * max(1, len(series))
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.0, 0.22 * bars + 2)), 4.2))
    for i, (name, vs) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, v in enumerate(vs) if v is not None]
        ax.bar(xs, [v for v in vs if v is not None], width, label=name)
    for y, label in hlines:
        ax.axhline(y, color="0.3", linestyle="--", linewidth=0.8)
        ax.annotate(label, (len(labels) - 0.5, y), ha="right", va="bottom", fontsize=7, color="0.3")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)  # also for one series: it names the baseline
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    fig.tight_layout()
    # No timestamp in the file: regenerating from the same JSON gives the same bytes.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def finite(v) -> Optional[float]:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


# ---------------------------------------------------------------------------------------
# The report's charts


LABEL_KEYS = {"sinkhorn": ("tokens", "n", "mode"), "mhc": ("tokens", "C", "dtype", "mode"),
              "hc": ("kind", "tokens", "C", "dtype", "mode"), "block": ("tokens", "dim", "dtype"),
              "streams": ("tokens", "C", "dtype", "op", "mode")}
PREFIX = {"tokens": "T=", "n": "n=", "C": "C=", "dim": "dim="}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def row_labels(bench: str, rows: List[dict]) -> Tuple[List[str], str]:
    """Short x-axis labels from the key fields that vary between rows, and the ones that don't
    (for the title)."""
    keys = LABEL_KEYS.get(bench) or [k for k, v in rows[0].items() if isinstance(v, (str, int)) and k != "mode"] + ["mode"]
    keys = [k for k in keys if all(k in r for r in rows)]
    cell = lambda r, k: f"{PREFIX.get(k, '')}{SHORT.get(r[k], r[k])}"  # noqa: E731
    varying = [k for k in keys if len({str(r[k]) for r in rows}) > 1]
    const = ", ".join(cell(rows[0], k) for k in keys if k not in varying)
    return [" ".join(cell(r, k) for k in varying) for r in rows], const


def speedup_series(bench: str, data: dict) -> Tuple[List[str], str, Dict[str, List[Optional[float]]]]:
    """(labels, what all rows share, {"vs <baseline>": hcext's speed-ups})."""
    if bench == "block":
        rows = data["results"]
        return (*row_labels(bench, rows), {"vs reference mHC": [r["speedup_hcext_vs_ref"] for r in rows]})
    rows = [r for r in data["results"] if r.get("mode") != "ops"]
    if not rows:
        return [], "", {}
    bases = [v for v in variants(data) if v != "hcext"]
    bases += [k[len("speedup_vs_"):] for r in rows for k in r if k.startswith("speedup_vs_") and not k.endswith("_min")]
    series = {f"vs {b}": [finite(r.get(f"speedup_vs_{b}")) for r in rows] for b in dict.fromkeys(bases)}
    return (*row_labels(bench, rows), {k: v for k, v in series.items() if any(x is not None for x in v)})


def bandwidth_series(bench: str, data: dict) -> Tuple[List[str], str, Dict[str, List[Optional[float]]]]:
    """Fraction of the copy's GB/s: the hcext sub-layer rows, then the stream-op rows."""
    rows = [r for r in data["results"] if r.get("bandwidth")]
    series = {"hcext sub-layer": [], "stream_aggregate": [], "stream_mix_expand": []}
    for r in rows:
        bw = r["bandwidth"]
        if bench == "streams":  # bench_streams: one op per row
            for op in ("aggregate", "mix_expand"):
                series[f"stream_{op}"].append(bw.get("fraction_of_copy") if r.get("op") == op else None)
            series["hcext sub-layer"].append(None)
            continue
        ops = r.get("mode") == "ops"
        series["hcext sub-layer"].append(None if ops else bw.get("fraction_of_copy"))
        series["stream_aggregate"].append(bw["aggregate"]["fraction_of_copy"] if ops else None)
        series["stream_mix_expand"].append(bw["mix_expand"]["fraction_of_copy"] if ops else None)
    if not rows:
        return [], "", {}
    return (*row_labels(bench, rows), {k: v for k, v in series.items() if any(x is not None for x in v)})


def chart_paths(rid: str, results_dir: str) -> List[str]:
    return [os.path.join(results_dir, f"{rid}-{kind}.png") for kind in ("speedup", "bandwidth")]


def draw_charts(results: Dict[str, dict], results_dir: str) -> List[str]:
    """Writes the PNGs of every result (matplotlib required); returns their paths."""
    written = []
    for rid, data in results.items():
        bench = benchmark_of(rid, data)
        speedup_png, bandwidth_png = chart_paths(rid, results_dir)
        labels, const, series = speedup_series(bench, data)
        if series:
            written.append(grouped_bars(
                speedup_png, f"{rid} ({const})\nhcext speed-up: baseline median / hcext median (>1: hcext faster)",
                labels, series, "speed-up (x)", hlines=[(1.0, "1x")]))
        if data["metadata"].get("device") == "cuda":
            labels, const, series = bandwidth_series(bench, data)
            if series:
                hlines = [(1.0, "copy")] + ([(1 / 3, "sub-layer target 1/3"), (0.8, "stream-op target 0.8")]
                                            if bench == "mhc" else [])
                written.append(grouped_bars(
                    bandwidth_png, f"{rid} ({const})\nachieved GB/s as a fraction of the copy's GB/s (medians)",
                    labels, series, "fraction of copy bandwidth", hlines=hlines, log=False))
    return written

