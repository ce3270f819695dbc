"""benchmarks/bench.py's driver end to end on CPU (gloo, tiny Flux config): sub-runs at N=1 and N=2, rows in
rows.jsonl, the merged markdown with this project's rows at rel err < 1e-4 vs the 1-GPU output.

It launches 2 torchrun sub-runs plus a resume check: about 45 s on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # XDIT_SLOW_TESTS=1
def test_driver_tiny(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--driver", "--tiny", "--gpus", "2",
           "--models", "flux1024", "--methods", "eager,xdit,xfuser,xfuser_ind", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    rows = {}
    for line in (out / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["key"]] = r
    for key in ("flux1024|eager|N1|1", "flux1024|xdit|N1|1", "flux1024|xdit|N2|u2", "flux1024|xdit|N2|r2"):
        assert key in rows, (key, sorted(rows))
        assert rows[key]["ms"] and rows[key]["ms"] > 0, rows[key]
    for key in ("flux1024|xdit|N1|1", "flux1024|xdit|N2|u2", "flux1024|xdit|N2|r2"):
        assert rows[key]["rel_err"] < 1e-4, rows[key]
    assert (out / "ref" / "flux1024.pt").exists()
    # a peer that isn't installed is a row saying so, not a failure of the run
    for meth in ("xfuser", "xfuser_ind"):
        xf = rows[f"flux1024|{meth}|N2|u2"]
        assert xf["ms"] is None and xf["note"].startswith("n/a"), xf

    md = (out / "bench.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "xdit_compile (eager)" in ln]
    got = {(c[1], c[3]): c for c in ([x.strip() for x in ln.split("|")] for ln in lines)}
    assert set(got) >= {("1", "1"), ("2", "u2"), ("2", "r2")}, lines
    for cells in got.values():
        assert float(cells[8].split()[0]) < 1e-4, cells  # rel err column
    assert "FLOPs/step (formula)" in md

    # resuming: a second driver run finds every row done and launches nothing
    p2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert "torch.distributed.run" not in p2.stdout and "all rows done" in p2.stdout, p2.stdout


def test_call_unwraps_nested_outputs():
    """Every row is compared as one tensor: a diffusers Transformer2DModelOutput, a (sample,) tuple and
    xfuser's SD3 wrapper's ((sample,),) all give the sample."""
    import torch
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench
    x = torch.arange(6.0).reshape(2, 3)
    for ret in (x, (x,), ((x,),), Transformer2DModelOutput(sample=x), [Transformer2DModelOutput(sample=x)]):
        assert bench.Worker.call(None, lambda **kw: ret, {}) is x


def test_profile_compute_union():
    """profile_step's busy time: overlapping compute kernels count once, barrier kernels, copies and memsets not."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_step as ps

    ks = [(0, 10, "nvjet_sm90_gemm"), (5, 15, "cudnn_sdpa_fprop"), (20, 30, "triton_poi_fused_add"),
          (30, 50, "c10d::symmetric_memory::barrier_kernel"), (40, 60, "Memcpy PtoP (Device -> Device)"),
          (60, 61, "Memset (Unknown)"), (70, 70, "nvjet_empty")]
    assert ps.compute_union(ks) == 25.0
    assert ps.compute_union([]) == 0.0


def test_trace_gaps(tmp_path):
    """trace_gaps: an interval with no compute kernel on any stream is a gap, named by the compute kernels either
    side (kernels on other streams that overlap count as compute), with what ran inside it; shorter gaps drop."""
    import gzip

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import trace_gaps

    def k(name, ts, dur, cat="kernel", tid=7):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}

    ev = [k("rope_q", 0, 10), k("gemm_side", 5, 10, tid=9),      # compute on two streams: busy until 15
          k("c10d::symmetric_memory::barrier_kernel(x)", 12, 30),  # waits 15 .. 40
          k("Memcpy PtoP (Device -> Device)", 14, 20, cat="gpu_memcpy"),
          k("flash_sdpa", 40, 50),                                  # gap 15 .. 40, after gemm_side (it ends last)
          k("gemm_out", 92, 10),                                    # gap 90 .. 92: below 5 us
          k("flash_sdpa", 140, 50), k("gemm_out", 220, 10)]          # gaps 102 .. 140 and 190 .. 220
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    lines = trace_gaps.analyse(str(path), steps=1, min_us=5)
    text = "\n".join(lines)
    assert "3 gaps of >= 5 us" in text and "0.09 ms per step" in text, text
    assert lines.index(next(ln for ln in lines if ln.startswith("| `gemm_out`"))) < lines.index(
        next(ln for ln in lines if ln.startswith("| `gemm_side`"))), text     # largest total first
    row = next(ln for ln in lines if ln.startswith("| `gemm_side`"))
    assert "`flash_sdpa`" in row and "| 0.03 | 25 |" in row, row
    assert "wait kernel 25" in row and "copy engine (PtoP) 19" in row, row
    row = next(ln for ln in lines if ln.startswith("| `flash_sdpa`"))
    assert "`gemm_out`" in row and "| 30 | nothing |" in row, row
    assert "Peer copies (copy engine): none recorded." in text, text   # one copy: nothing to pair

    # with the one above: three more one after another (4 us apart), then two that overlap: 1 of 5 pairs overlapped
    p2p = [k("Memcpy PtoP (Device -> Device)", ts, 20, cat="gpu_memcpy") | {"args": {"bytes": 6_000_000}}
           for ts in (300, 324, 348, 400, 410)]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev + p2p}, f)
    line = trace_gaps.analyse(str(path), steps=1, min_us=5)[-2]
    assert line.startswith("Peer copies (copy engine): 6; 1 of 5 consecutive pairs overlapped"), line
    assert "median 20.0 us each (300 GB/s)" in line and "back-to-back copies 4.0 us" in line, line


def test_profile_kinds():
    """profile_step's kernel kinds: Inductor's GEMM templates are matmuls, its other Triton kernels elementwise."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_step as ps

    assert ps.kind("triton_tem_fused_addmm_t_24") == "matmul"
    assert ps.kind("nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_TNT") == "matmul"
    assert ps.kind("triton_poi_fused_all_to_all_single_clone_permute_view_12") == "fused elementwise (triton)"
    assert ps.kind("memcpyDtoD2D_kernel") == "layout copies (aten copy / cat)"


def test_profile_fake_world(tmp_path):
    """profile_step --fake-world 2: one process stands for rank 0 of two (torch's fake process group), so the plan
    is ulysses 2 and the step runs at a rank's shapes, with the nccl and the copy-engine transfers (own pieces
    only); a mode that needs real peers is refused."""
    out = tmp_path / "rank.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--tiny", "--model", "flux1024",
           "--fake-world", "2", "--steps", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "fake process group" in text and "'ulysses': 2" in text and "'all_to_all': 'nccl'" in text, text
    assert "2 ranks" in text, text
    r = subprocess.run(cmd + ["--all-to-all", "copy_engine"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "'all_to_all': 'copy_engine'" in out.read_text(), out.read_text()
    r = subprocess.run(cmd + ["--all-to-all", "symm_mem"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "needs real peers" in r.stderr, r.stderr[-2000:]
