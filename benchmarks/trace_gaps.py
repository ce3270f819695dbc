"""Where a recorded step has no compute kernel running (profile_step.py --trace): each such gap, named by the
compute kernels that end before it and start after it, and what else ran in it (barrier kernels, copy-engine
copies, the own piece's copy kernel, memsets), summed per step over gaps of the same (before, after) pair.

    python benchmarks/trace_gaps.py TRACE.json.gz [--steps N] [--min-us 5] [--md out.md]

CUDA graphs spread one stream's kernels over many streams, so "compute" is every kernel except the
copy-engine barrier, the spin-wait kernel, copies and memsets, on any stream; a gap is time when none runs.

It also says whether the peer copies (copy engine, one stream per destination) ever ran at the same time: how many
back-to-back pairs overlapped, each copy's median time and rate, and the median idle time between consecutive ones.
"""
from __future__ import annotations

import collections
import gzip
import json

NOT_COMPUTE = ("barrier_kernel", "_spin_wait_kernel", "memcpy", "memset")


def _short(name: str) -> str:
    return name.split("(")[0][:58]


def _kind(name: str) -> str:
    low = name.lower()
    if "barrier_kernel" in low or "spin_wait" in low:
        return "wait kernel"
    if "ptop" in low:
        return "copy engine (PtoP)"
    if "memcpydtod" in low:
        return "own-piece copy kernel"
    if "memset" in low:
        return "memset"
    if "memcpy" in low:
        return "other copy"
    return "compute"


def analyse(path: str, steps: int, min_us: float) -> list[str]:
    ev = [e for e in json.load(gzip.open(path))["traceEvents"]
          if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur", 0) > 0]
    comp = sorted((e for e in ev if not any(k in e["name"].lower() for k in NOT_COMPUTE)), key=lambda e: e["ts"])
    other = [e for e in ev if any(k in e["name"].lower() for k in NOT_COMPUTE)]
    gaps = []                     # (start, end, kernel before, kernel after)
    end, last = None, None
    for e in comp:
        if end is not None and e["ts"] - end >= min_us:
            gaps.append((end, e["ts"], last, e["name"]))
        if end is None or e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e["name"]
    by = collections.defaultdict(lambda: [0, 0.0, collections.Counter()])
    for a, b, before, after in gaps:
        row = by[(_short(before), _short(after))]
        row[0] += 1
        row[1] += b - a
        for o in other:   # what ran inside the gap, by kind, us of overlap
            ov = min(b, o["ts"] + o["dur"]) - max(a, o["ts"])
            if ov > 0:
                row[2][_kind(o["name"])] += ov
    total = sum(b - a for a, b, _, _ in gaps)
    span = (max(e["ts"] + e["dur"] for e in comp) - min(e["ts"] for e in comp)) if comp else 0.0
    out = [f"## {path.rsplit('/', 1)[-1]}", "",
           f"{len(gaps)} gaps of >= {min_us:g} us with no compute kernel on any stream in {steps} step(s): "
           f"{total / 1e3 / steps:.2f} ms per step (first to last compute kernel: {span / 1e3 / steps:.1f} ms per "
           "step).", "",
           "| compute kernel before | compute kernel after | gaps per step | ms per step | mean us | "
           "ran inside (us per gap) |",
           "|---|---|---|---|---|---|"]
    for (before, after), (n, t, inside) in sorted(by.items(), key=lambda kv: -kv[1][1])[:12]:
        ins = ", ".join(f"{k} {v / n:.0f}" for k, v in inside.most_common(3)) or "nothing"
        out.append(f"| `{before}` | `{after}` | {n / steps:g} | {t / 1e3 / steps:.2f} | {t / n:.0f} | {ins} |")
    return out + ["", _peer_copies(ev), ""]


def _peer_copies(ev: list) -> str:
    """One line: do a rank's copy-engine peer copies run concurrently, or one at a time?"""
    p2p = sorted((e for e in ev if "ptop" in e["name"].lower()), key=lambda e: e["ts"])
    if len(p2p) < 2:
        return "Peer copies (copy engine): none recorded."
    pairs = list(zip(p2p, p2p[1:]))
    overlap = sum(b["ts"] < a["ts"] + a["dur"] for a, b in pairs)
    idle = sorted(g for g in (b["ts"] - a["ts"] - a["dur"] for a, b in pairs) if 0 <= g < 10)
    dur = sorted(e["dur"] for e in p2p)
    rate = sorted(e.get("args", {}).get("bytes", 0) / e["dur"] / 1e3 for e in p2p)
    mid = lambda xs: xs[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return (f"Peer copies (copy engine): {len(p2p)}; {overlap} of {len(pairs)} consecutive pairs overlapped in time; "
            f"median {mid(dur):.1f} us each ({mid(rate):.0f} GB/s); median idle between back-to-back copies "
            f"{mid(idle):.1f} us.")


if __name__ == "__main__":
    from trace_barriers import cli
    cli("Time with no compute kernel running, in recorded traces (rank 0)", analyse, min_us=(float, 5.0))
