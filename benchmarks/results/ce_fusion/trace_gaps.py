"""GPU idle time of one FLUX step in a chrome trace of benchmarks/profile_step.py, by the kernels around each gap:
    python trace_gaps.py TRACE.json.gz [STEP]
(STEP: which of the trace's steps, 57 attentions each; default 1, the second.) Copies and barrier kernels do not
count as busy: a gap before a barrier is compute waiting for a transfer."""
import collections
import gzip
import json
import sys

path, step = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
ev = [e for e in json.load(gzip.open(path))["traceEvents"]
      if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
ev.sort(key=lambda e: e["ts"])
sdpa = [i for i, e in enumerate(ev) if "sdpa" in e["name"]]
s0, s1 = ev[sdpa[57 * step]]["ts"] - 3000, ev[sdpa[57 * step + 56]]["ts"] + 2000
iv = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
            if s0 <= e["ts"] <= s1 and e["cat"] == "kernel" and "barrier" not in e["name"])
gaps, total = collections.Counter(), 0.0
end, name = iv[0][1], iv[0][2]
for a, b, n in iv[1:]:
    if a > end + 2:
        gaps[(name[:40], n[:40])] += a - end
        total += a - end
    if b > end:
        end, name = b, n
print(f"span {(iv[-1][1] - iv[0][0]) / 1000:.2f} ms, idle (gaps > 2 us) {total / 1000:.2f} ms")
for (before, after), us in gaps.most_common(15):
    print(f"{us:8.0f} us  after {before!r:44} before {after!r}")
