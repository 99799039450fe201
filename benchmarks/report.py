"""Regenerates benchmarks/RESULTS.md (and the summary table in README.md) from the benchmarks'
JSON files, benchmarks/results/*.json.

    python -m benchmarks.report [--results-dir DIR] [--out PATH] [--readme PATH | --no-readme]
                                [--no-charts]

How the hand-written text survives: RESULTS.md is prose (method, what is timed, how to
reproduce, targets, analysis) around generated regions,

    <!-- BEGIN GENERATED: mhc-cpu -->
    ...tables made from results/mhc-cpu.json...
    <!-- END GENERATED: mhc-cpu -->

and only the text between a pair of markers is replaced. A region's id is the name of its JSON
file without ``.json``; two more ids: ``runs`` (one row per JSON: device, torch, CUDA, commit,
date) and ``summary`` (the headline table, meant for README.md). A region whose JSON is missing
says how to produce it; a JSON without a region gets a new section at the end of the file (move
it and write its prose at will: the markers are all that count). A file that does not exist yet
is created with one section per JSON.

Charts need matplotlib (optional): <results dir>/<id>-speedup.png (hcext's speed-up over every
baseline, per shape and mode) and, for GPU runs, <id>-bandwidth.png (GB/s as a fraction of the
copy's). A region links the PNGs that exist; without matplotlib it says how to get them.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import charts, harness  # noqa: E402
from benchmarks.tables import (  # noqa: E402
    ORDER, TABLES, TITLES, block_speedup, block_timings, benchmark_of, generic_tables, md_table, ms, ratio,
)

RESULTS_DIR = harness.RESULTS_DIR
RESULTS_MD = os.path.join(harness.REPO_ROOT, "benchmarks", "RESULTS.md")
README = os.path.join(harness.REPO_ROOT, "README.md")

REGION = re.compile(
    r"<!-- BEGIN GENERATED: (?P<id>[\w.-]+) -->\n(?P<body>.*?)<!-- END GENERATED: (?P=id) -->", re.S
)


# ---------------------------------------------------------------------------------------
# Loading


def load_results(results_dir: str) -> Dict[str, dict]:
    """{id: data} for every benchmark JSON in results_dir (id: file name without .json), in
    report order."""
    out = {}
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and {"metadata", "results"} <= set(data):  # else not a benchmark's
            data["_path"] = path
            out[os.path.splitext(os.path.basename(path))[0]] = data
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0], kv[1])))


def _order(rid: str, data: dict):
    b = benchmark_of(rid, data)
    return (ORDER.index(b) if b in ORDER else len(ORDER), b, rid)


# ---------------------------------------------------------------------------------------
# Regions


def _date(meta: dict) -> str:
    try:
        d = datetime.datetime.fromisoformat(meta["date"]).astimezone(datetime.timezone.utc)
        return d.strftime("%Y-%m-%d %H:%M UTC")
    except (KeyError, TypeError, ValueError):
        return "-"


def _commit(meta: dict) -> str:
    c = meta.get("git_commit")
    return "-" if not c else c[:7] + ("-dirty" if c.endswith("-dirty") else "")


def _load(meta: dict) -> str:
    la = [meta.get("loadavg_start"), meta.get("loadavg_end")]
    la = [f"{x[0]:.1f}" for x in la if x]
    return " → ".join(la) if la else "-"


def _threads(meta: dict) -> str:
    t = meta.get("threads")
    return "-" if t is None else f"{t} thread" + ("" if t == 1 else "s")


def _rel(path: str, doc_path: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.abspath(doc_path))).replace(os.sep, "/")


def source_line(rid: str, data: dict, doc_path: str) -> str:
    meta, rel = data["metadata"], _rel(data["_path"], doc_path)
    cuda = f", CUDA {meta.get('cuda_version')}" if meta.get("device") == "cuda" else ""
    quick = " **A --quick smoke run: not a measurement.**" if (data.get("config") or {}).get("quick") else ""
    threads = f", {_threads(meta)}" if meta.get("device") != "cuda" else ""
    return (f"*Generated from [`{rel}`]({rel}): {meta.get('device_name', meta.get('device'))}{threads}, "
            f"torch {meta.get('torch_version')}{cuda}, hcext {_commit(meta)}, {_date(meta)}, "
            f"load average {_load(meta)}. Times: median (min) ms; ratios: baseline / hcext, medians (mins).*{quick}")


def chart_lines(rid: str, doc_path: str, results_dir: str) -> List[str]:
    pngs = [p for p in charts.chart_paths(rid, results_dir) if os.path.exists(p)]
    if not pngs:
        return ["*Charts: `pip install matplotlib`, then `python -m benchmarks.report`.*"]
    return [f"![{os.path.splitext(os.path.basename(p))[0]}]({_rel(p, doc_path)})" for p in pngs]


def run_region(rid: str, data: dict, doc_path: str, results_dir: str) -> str:
    tables = TABLES.get(benchmark_of(rid, data), generic_tables)(data)
    return "\n\n".join([source_line(rid, data, doc_path), tables] + chart_lines(rid, doc_path, results_dir))


def runs_region(results: Dict[str, dict], doc_path: str) -> str:
    header = ["results", "benchmark", "device", "threads", "torch", "CUDA", "hcext commit", "date",
              "load average (1 min)"]
    rows = []
    for rid, data in results.items():
        meta, rel = data["metadata"], _rel(data["_path"], doc_path)
        quick = " (--quick)" if (data.get("config") or {}).get("quick") else ""
        rows.append([f"[`{rid}`]({rel}){quick}", benchmark_of(rid, data), str(meta.get("device_name", "-")),
                     str(meta.get("threads", "-")), str(meta.get("torch_version", "-")),
                     str(meta.get("cuda_version") or "-"), _commit(meta), _date(meta), _load(meta)])
    return md_table(header, rows) if rows else "*No results.*"


def headline_rows(rid: str, data: dict) -> List[List[str]]:
    """The summary's rows for one JSON: Sinkhorn's target case; for the sub-layers fwd+bwd at the
    largest T and, per dtype, the largest C (dynamic HC); every block row."""
    bench, meta, rows = benchmark_of(rid, data), data["metadata"], data["results"]
    run = f"{meta.get('device_name')}" if meta.get("device") == "cuda" else f"CPU, {_threads(meta)}"
    out = []
    if bench == "block":
        for r in rows:
            t = block_timings(r)
            case = (f"mHC block fwd+bwd, {r['tokens']} tokens, dim {r['dim']}, {r['dtype']}; "
                    f"overhead vs residual block {r['overhead_vs_residual']['hcext_mhc']:+.0%}")
            out.append([TITLES[bench], case, run, ms(t["hcext_mhc"]), block_speedup(r), "-", "-"])
        return out
    if bench not in ("sinkhorn", "mhc", "hc"):
        return out
    picked = [r for r in rows if r.get("mode") == "fwd+bwd" and r.get("kind", "dynamic") == "dynamic"]
    if not picked:
        return out
    T = max(r["tokens"] for r in picked)
    picked = [r for r in picked if r["tokens"] == T]
    if bench == "sinkhorn":
        picked = [r for r in picked if r["n"] == min(p["n"] for p in picked)]
    else:
        picked = [r for r in picked if r["C"] == max(p["C"] for p in picked if p["dtype"] == r["dtype"])]
    for r in picked:
        if bench == "sinkhorn":
            case = f"fwd+bwd, T={r['tokens']}, n={r['n']}, {r['dtype']}"
        else:
            case = f"{r.get('kind', '') + ' ' if bench == 'hc' else ''}fwd+bwd, T={r['tokens']}, C={r['C']}, {r['dtype']}"
        other = next((f"{name} {ratio(r, b)}" for b, name in (("package", "hyper-connections"), ("liger", "Liger"))
                      if f"speedup_vs_{b}" in r), "-")
        out.append([TITLES[bench], case, run, ms(r["timings"].get("hcext")), ratio(r, "eager"),
                    ratio(r, "compiled"), other])
    return out


def summary_region(results: Dict[str, dict], doc_path: str, results_md: str) -> str:
    header = ["benchmark", "case", "run", "hcext ms", "vs eager reference", "vs torch.compile reference",
              "vs other implementation"]
    rows = [row for rid, data in results.items() for row in headline_rows(rid, data)]
    dates = sorted({d["metadata"].get("date", "")[:10] for d in results.values()})
    note = (f"*Generated by `python -m benchmarks.report` from {len(results)} result files "
            f"({' to '.join(dict.fromkeys([dates[0], dates[-1]]))}). Median (min) ms; speed-ups: baseline / hcext, medians (mins). "
            f"Every table, the method and the analysis: [{_rel(results_md, doc_path)}]({_rel(results_md, doc_path)}).*"
            if results else "*No results yet.*")
    return md_table(header, rows) + "\n\n" + note if rows else note


def missing_region(rid: str, results_dir: str, doc_path: str) -> str:
    """What a region says when its JSON does not exist (yet)."""
    m = re.fullmatch(r"(?P<bench>[a-z0-9_]+)-(?P<device>cpu|cuda)(?:-(?P<threads>\d+)threads?)?", rid)
    cmd = "python -m benchmarks"
    if m:
        cmd += f" --only {m['bench']}" + (" --device cuda" if m["device"] == "cuda" else "")
        cmd += f" --threads {m['threads']}" if m["threads"] else ""
    rel = _rel(os.path.join(results_dir, rid + ".json"), doc_path)
    return f"*Not measured yet: `{rel}` does not exist (`{cmd}` writes it).*"


# ---------------------------------------------------------------------------------------
# Documents


def wrap(rid: str, body: str) -> str:
    return f"<!-- BEGIN GENERATED: {rid} -->\n{body.strip()}\n<!-- END GENERATED: {rid} -->"


def update_document(text: str, regions: Dict[str, str], missing: Callable[[str], str],
                    new_section: Optional[Callable[[str], str]]) -> str:
    """Replaces the body of every marked region of text: with regions[id], or missing(id) when
    there is none. Regions not in text are appended as new_section(id) (None: left out)."""
    found = []

    def sub(m):
        found.append(m["id"])
        return wrap(m["id"], regions[m["id"]] if m["id"] in regions else missing(m["id"]))

    text = REGION.sub(sub, text)
    if new_section is not None:
        for rid in regions:
            if rid not in found:
                text = text.rstrip("\n") + "\n\n" + new_section(rid) + "\n"
    return text


SKELETON = """# hcext benchmark results

Generated by `python -m benchmarks.report` from the benchmarks' JSON files. Only the text between a
BEGIN GENERATED and an END GENERATED comment is regenerated: write the method and the analysis
around them.

## Runs

{runs}
"""


def render_document(text: str, results: Dict[str, dict], results_dir: str, doc_path: str) -> str:
    """The results document ``text`` (to be written at doc_path) with every region regenerated."""
    regions = {"runs": runs_region(results, doc_path)}
    regions.update({rid: run_region(rid, data, doc_path, results_dir) for rid, data in results.items()})

    def section(rid):  # a new section for a region the document lacks
        bench = benchmark_of(rid, results[rid]) if rid in results else rid
        title = f"{TITLES.get(bench, bench)}: `{rid}`" if rid in results else rid.title()
        return f"## {title}\n\n" + wrap(rid, regions[rid])

    return update_document(text, regions, lambda rid: missing_region(rid, results_dir, doc_path), section)


def render_readme(text: str, results: Dict[str, dict], readme_path: str, doc_path: str) -> str:
    """The README ``text`` with its ``summary`` region regenerated (nothing appended)."""
    summary = summary_region(results, readme_path, doc_path)
    return update_document(text, {"summary": summary}, lambda rid: f"*Unknown region `{rid}`.*", None)


def render(results_dir: str, doc_path: str, readme_path: Optional[str] = None) -> Dict[str, str]:
    """{path: new text} for the results document and (when given and it has a ``summary``
    region) the README. Reads the JSONs, the existing documents and which PNGs exist; writes
    nothing."""
    results = load_results(results_dir)
    if os.path.exists(doc_path):
        with open(doc_path) as f:
            text = f.read()
    else:
        text = SKELETON.format(runs=wrap("runs", ""))
    out = {doc_path: render_document(text, results, results_dir, doc_path)}
    if readme_path and os.path.exists(readme_path):
        with open(readme_path) as f:
            text = f.read()
        if REGION.search(text):
            out[readme_path] = render_readme(text, results, readme_path, doc_path)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=RESULTS_DIR, help="where the JSON files are (default benchmarks/results)")
    p.add_argument("--out", default=None,
                   help="the markdown to update or create (default: benchmarks/RESULTS.md for the default "
                        "results directory, else <results-dir>/RESULTS.md)")
    p.add_argument("--readme", default=None,
                   help="a README whose `summary` region to update (default: README.md for the default "
                        "results directory, else none)")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone")
    p.add_argument("--no-charts", action="store_true", help="draw no PNGs (existing ones stay linked)")
    args = p.parse_args(argv)

    default_dir = os.path.abspath(args.results_dir) == os.path.abspath(RESULTS_DIR)
    doc = args.out or (RESULTS_MD if default_dir else os.path.join(args.results_dir, "RESULTS.md"))
    readme = None if args.no_readme else args.readme or (README if default_dir else None)
    results = load_results(args.results_dir)
    if not results:
        print(f"no benchmark JSON in {args.results_dir}", file=sys.stderr)
    if not args.no_charts:
        if charts.available():
            for path in charts.draw_charts(results, args.results_dir):
                print(f"wrote {path}")
        else:
            print("charts skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    for path, text in render(args.results_dir, doc, readme).items():
        old = open(path).read() if os.path.exists(path) else None
        if text != old:
            with open(path, "w") as f:
                f.write(text)
        print(f"{'wrote' if text != old else 'unchanged'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
