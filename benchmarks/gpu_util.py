"""Shared pieces of the GPU micro-benchmarks: the torchrun start (a2a_bw.py, ce_overlap.py, ce_check.py), rows
printed by rank 0 (ce_check.py, ring_check.py) and a CUDA-event timer (gemm_fusion.py, ce_local_copy.py)."""
from __future__ import annotations

import json
import os
import statistics

import torch
import torch.distributed as dist


def init_nccl() -> tuple[torch.device, int, int]:
    """This torchrun rank on its GPU (LOCAL_RANK) with the NCCL process group up: (device, rank, world size)."""
    lr = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(lr)
    dev = torch.device("cuda", lr)
    dist.init_process_group("nccl", device_id=dev)
    return dev, dist.get_rank(), dist.get_world_size()


def reporter(rank: int):
    """(rows, report): report(**row) keeps the row and rank 0 prints it as one JSON line."""
    rows = []

    def report(**kw):
        rows.append(kw)
        if rank == 0:
            print(json.dumps(kw), flush=True)
    return rows, report


def timed_us(fn, reps: int = 10, samples: int = 20) -> float:
    """us per call of fn: median of `samples` CUDA-event timings of `reps` back-to-back calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / reps * 1e3)
    return statistics.median(out)
