"""What the copy-engine barrier kernels cost in a recorded 4-GPU trace (profile_step.py --trace, XDIT_CE_SIGNAL
barrier): how long they run, how much of that beside compute kernels, and how much slower each compute kernel
(same name and grid) ran when a barrier kernel overlapped it for > 30% of its time.

    python benchmarks/trace_barriers.py TRACE.json.gz [--steps N] [--md out.md]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics


def _overlap(a, b) -> float:
    return max(0.0, min(a["ts"] + a["dur"], b["ts"] + b["dur"]) - max(a["ts"], b["ts"]))


def analyse(path: str, steps: int) -> list[str]:
    ev = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("cat") == "kernel"]
    bar = [e for e in ev if "barrier_kernel" in e["name"]]
    comp = [e for e in ev if "barrier_kernel" not in e["name"] and "memcpy" not in e["name"].lower()]
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in comp)
    merged: list[list[float]] = []
    for a, b in iv:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    busy = lambda a, b: sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged)  # noqa: E731
    total = sum(e["dur"] for e in bar)
    alone = sum(e["dur"] - busy(e["ts"], e["ts"] + e["dur"]) for e in bar)
    by = collections.defaultdict(lambda: ([], []))
    for e in comp:
        key = (e["name"][:60], str(e.get("args", {}).get("grid")))
        o = sum(_overlap(e, b) for b in bar)
        if o == 0:
            by[key][0].append(e["dur"])
        elif o > 0.3 * e["dur"]:
            by[key][1].append(e["dur"])
    rows = []
    for key, (a, b) in by.items():
        if len(a) >= 3 and b:
            rows.append((sum(b) - statistics.median(a) * len(b), key, a, b))
    rows.sort(key=lambda r: r[0], reverse=True)
    extra = sum(r[0] for r in rows)
    out = [f"## {path.rsplit('/', 1)[-1]}", "",
           f"{len(bar)} barrier kernels in {steps} steps: {total / 1e3 / steps:.2f} ms per step, of which "
           f"{(total - alone) / 1e3 / steps:.2f} ms beside compute kernels and {alone / 1e3 / steps:.2f} ms with none "
           f"running. Compute kernels overlapped by a barrier ran {extra / 1e3 / steps:.2f} ms per step longer than "
           "the median of the same kernel (name, grid) without one.", "",
           "| kernel | grid | n without a barrier | mean us | n beside a barrier | mean us | p90 us | extra ms per step |",
           "|---|---|---|---|---|---|---|---|"]
    for ex, (name, grid), a, b in rows[:6]:
        out.append(f"| `{name}` | {grid} | {len(a)} | {statistics.mean(a):.1f} | {len(b)} | {statistics.mean(b):.1f} | "
                   f"{sorted(b)[int(0.9 * len(b))]:.1f} | {ex / 1e3 / steps:.2f} |")
    return out + [""]


def cli(title: str, analyse_fn, **options) -> None:
    """The command line of this and trace_gaps.py: traces, --steps per trace, --md; `options` adds keyword
    arguments of analyse_fn as --flags (name: (type, default))."""
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--steps", type=int, nargs="+", default=[3], help="profiled steps in each trace")
    for name, (typ, default) in options.items():
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=default)
    ap.add_argument("--md", default="")
    args = ap.parse_args()
    kw = {name: getattr(args, name) for name in options}
    lines = []
    for i, t in enumerate(args.traces):
        lines += analyse_fn(t, args.steps[min(i, len(args.steps) - 1)], **kw)
    text = "\n".join(lines)
    print(text)
    if args.md:
        open(args.md, "w").write(f"# {title}\n\n" + text + "\n")


if __name__ == "__main__":
    cli("Barrier kernels in recorded copy-engine traces (rank 0)", analyse)
