"""Print one rank's GPU timeline (kernels, copies, memsets; us from the start of attention K) from a chrome
trace of benchmarks/profile_step.py:  python trace_blocks.py TRACE.json.gz K
(FLUX: attentions 0-18 of a step are the double blocks, 19-56 the single blocks; the traces hold 3 steps.)"""
import gzip
import json
import sys

path, k = sys.argv[1], int(sys.argv[2])
ev = [e for e in json.load(gzip.open(path))["traceEvents"]
      if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
ev.sort(key=lambda e: e["ts"])
sdpa = [i for i, e in enumerate(ev) if "sdpa" in e["name"]]
t0 = ev[sdpa[k]]["ts"]
for e in ev[sdpa[k]:sdpa[k + 1] + 1]:
    print(f'{e["ts"] - t0:9.1f} {e["dur"]:7.1f} stream {e["args"].get("stream")} {e["name"][:70]}')
