"""Markdown tables from the benchmarks' JSON (benchmarks/results/*.json), for benchmarks/report.py.

One function per benchmark gives the same columns as that benchmark's own printed tables, from
the JSON alone (``generic_tables`` covers a benchmark it does not know: a new bench_*.py).
Times are 'median (min)' ms as the benchmarks print them; hcext's speed-ups are baseline /
hcext, 'median-ratio (min-ratio)'.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks import harness

ORDER = ("sinkhorn", "mhc", "hc", "block", "streams")  # report order; other benchmarks follow by name
TITLES = {"sinkhorn": "Sinkhorn-Knopp", "mhc": "mHC sub-layer", "hc": "HC sub-layer", "block": "Transformer block",
          "streams": "Stream ops"}
AUX = ("copy", "clone")  # yardsticks timed with the variants: columns of their own, not variants
SINKHORN_TARGET = (65536, 4, "fwd+bwd")  # the issue's target case: bold in the table
OPS_INTRO = ("Stream ops alone (forward, no grad, fixed coefficients; aggregate moves `(n + 1)·C·s` per token, "
             "mix_expand `(2n + 1)·C·s`):")


def benchmark_of(rid: str, data: dict) -> str:
    return (data.get("config") or {}).get("benchmark") or rid.split("-")[0]


def variants(data: dict) -> List[str]:
    """The timed variants of a sub-layer benchmark, in the JSON's order (hcext first)."""
    names = list((data.get("config") or {}).get("variants") or [])
    for r in data["results"]:
        if r.get("mode") == "ops":  # the stream-op rows time other things
            continue
        names += [k for k in r.get("timings", {}) if k not in names and k not in AUX]
    return names


# ---------------------------------------------------------------------------------------
# Cells


def ms(t: Optional[dict]) -> str:
    """'median (min)' ms of a JSON timing summary, formatted as the benchmarks print it."""
    if not t:
        return "-"
    return harness.fmt_ms(SimpleNamespace(median=t["median_ms"], min=t["min_ms"]))


def ratio(row: dict, base: str) -> str:
    """hcext's speed-up over ``base``: 'median-ratio (min-ratio)'."""
    v = row.get(f"speedup_vs_{base}")
    if v is None:
        return "-"
    vmin = row.get(f"speedup_vs_{base}_min")
    return f"{v:.1f}x" + (f" ({vmin:.1f}x)" if vmin is not None else "")


def num(d: Optional[dict], key: str, fmt: str) -> str:
    return format(d[key], fmt) if d and d.get(key) is not None else "-"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], bold: Sequence[bool] = ()) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, cells in enumerate(rows):
        if i < len(bold) and bold[i]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Tables per benchmark (the same columns as the benchmarks' own printed tables)


def sinkhorn_tables(data: dict) -> str:
    vs = variants(data)
    header = ["T", "n", "mode"] + [f"{v} ms" for v in vs] + [f"hcext vs {b}" for b in vs if b != "hcext"]
    rows, bold = [], []
    for r in data["results"]:
        rows.append([str(r["tokens"]), str(r["n"]), r["mode"]] + [ms(r["timings"].get(v)) for v in vs]
                    + [ratio(r, b) for b in vs if b != "hcext"])
        bold.append((r["tokens"], r["n"], r["mode"]) == SINKHORN_TARGET)
    return md_table(header, rows, bold)


def mhc_tables(data: dict) -> str:
    vs = variants(data)
    header = (["T", "C", "dtype", "mode"] + [f"{v} ms" for v in vs] + ["copy ms", "clone ms"]
              + [f"hcext vs {b}" for b in vs if b != "hcext"]
              + ["hcext GB/s", "copy GB/s", "of copy", "of copy (x read per op)"])
    rows, ops_rows = [], []
    for r in data["results"]:
        t, key = r["timings"], [str(r["tokens"]), str(r["C"]), r["dtype"]]
        if r["mode"] == "ops":
            bw = r["bandwidth"]
            cells = list(key)
            for op in ("aggregate", "mix_expand"):
                cells += [ms(t.get(op)), num(bw.get(op), "gbps", ".1f"), num(bw.get(op), "fraction_of_copy", ".2f")]
            ops_rows.append(cells + [ms(t.get("copy")), num(bw.get("aggregate"), "copy_gbps", ".1f")])
            continue
        bw, bw2 = r.get("bandwidth"), r.get("bandwidth_two_pass")
        rows.append(key + [r["mode"]] + [ms(t.get(v)) for v in vs] + [ms(t.get("copy")), ms(t.get("clone"))]
                    + [ratio(r, b) for b in vs if b != "hcext"]
                    + [num(bw, "gbps", ".1f"), num(bw, "copy_gbps", ".1f"), num(bw, "fraction_of_copy", ".2f"),
                       num(bw2, "fraction_of_copy", ".2f")])
    out = md_table(header, rows)
    if ops_rows:
        ops_header = ["T", "C", "dtype", "aggregate ms", "aggregate GB/s", "of copy", "mix_expand ms",
                      "mix_expand GB/s", "of copy", "copy ms", "copy GB/s"]
        out += "\n\n" + OPS_INTRO + "\n\n" + md_table(ops_header, ops_rows)
    return out


def hc_tables(data: dict) -> str:
    vs = variants(data)
    header = (["kind", "T", "C", "dtype", "mode"] + [f"{v} ms" for v in vs] + ["copy ms"]
              + [f"hcext vs {b}" for b in vs if b != "hcext"] + ["hcext GB/s", "of copy"])
    rows = []
    for r in data["results"]:
        t, bw = r["timings"], r.get("bandwidth")
        rows.append([r["kind"], str(r["tokens"]), str(r["C"]), r["dtype"], r["mode"]] + [ms(t.get(v)) for v in vs]
                    + [ms(t.get("copy"))] + [ratio(r, b) for b in vs if b != "hcext"]
                    + [num(bw, "gbps", ".1f"), num(bw, "fraction_of_copy", ".2f")])
    return md_table(header, rows)


def streams_tables(data: dict) -> str:
    """bench_streams: per op and mode, every variant, the copy, hcext's speed-ups, and the bytes
    the op must move against its time (GB/s, fraction of the copy's)."""
    vs = variants(data)
    header = (["T", "C", "dtype", "op", "mode"] + [f"{v} ms" for v in vs] + ["copy ms"]
              + [f"hcext vs {b}" for b in vs if b != "hcext"] + ["MB moved", "hcext GB/s", "copy GB/s", "of copy"])
    rows = []
    for r in data["results"]:
        t, bw = r["timings"], r.get("bandwidth")
        moved = r.get("bytes_must_move")
        rows.append([str(r["tokens"]), str(r["C"]), r["dtype"], r["op"], r["mode"]] + [ms(t.get(v)) for v in vs]
                    + [ms(t.get("copy"))] + [ratio(r, b) for b in vs if b != "hcext"]
                    + ["-" if moved is None else f"{moved / 1e6:.1f}", num(bw, "gbps", ".1f"),
                       num(bw, "copy_gbps", ".1f"), num(bw, "fraction_of_copy", ".2f")])
    return md_table(header, rows)


BLOCK_VARIANTS = ("residual", "hcext_mhc", "ref_mhc")


def block_timings(r: dict) -> Dict[str, dict]:
    return {k: {"median_ms": r["median_ms"][k], "min_ms": r["min_ms"][k]} for k in r["median_ms"]}


def block_speedup(r: dict) -> str:
    t = block_timings(r)
    return f"{r['speedup_hcext_vs_ref']:.1f}x ({t['ref_mhc']['min_ms'] / t['hcext_mhc']['min_ms']:.1f}x)"


def block_tables(data: dict) -> str:
    header = (["tokens", "dim", "n", "dtype"] + [f"{v} ms" for v in BLOCK_VARIANTS]
              + ["hcext vs reference mHC", "mHC overhead: hcext", "mHC overhead: reference"])
    rows = []
    for r in data["results"]:
        t, ov = block_timings(r), r["overhead_vs_residual"]
        rows.append([str(r["tokens"]), str(r["dim"]), str(r["streams"]), r["dtype"]]
                    + [ms(t.get(v)) for v in BLOCK_VARIANTS]
                    + [block_speedup(r), f"{ov['hcext_mhc']:+.0%}", f"{ov['ref_mhc']:+.0%}"])
    return md_table(header, rows)


def generic_tables(data: dict) -> str:
    """Any other benchmark (a new bench_*.py): its scalar fields, 'median (min)' of every timed
    variant, and its speedup_vs_* fields."""
    rows = data["results"]
    if not rows:
        return "*No rows.*"
    keys = [k for k, v in rows[0].items() if isinstance(v, (str, int, float)) and not k.startswith("speedup")]
    timed = [k for r in rows for k in r.get("timings", {})]
    timed = list(dict.fromkeys(timed))
    bases = list(dict.fromkeys(k[len("speedup_vs_"):] for r in rows for k in r
                               if k.startswith("speedup_vs_") and not k.endswith("_min")))
    header = keys + [f"{v} ms" for v in timed] + [f"hcext vs {b}" for b in bases]
    cells = [[_cell(r.get(k)) for k in keys] + [ms(r.get("timings", {}).get(v)) for v in timed]
             + [ratio(r, b) for b in bases] for r in rows]
    return md_table(header, cells)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


TABLES: Dict[str, Callable[[dict], str]] = {
    "sinkhorn": sinkhorn_tables, "mhc": mhc_tables, "hc": hc_tables, "block": block_tables,
    "streams": streams_tables,
}
