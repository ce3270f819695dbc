"""Shared start of the torchrun GPU micro-benchmarks (a2a_bw.py, ce_overlap.py, ce_check.py)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_nccl() -> tuple[torch.device, int, int]:
    """This torchrun rank on its GPU (LOCAL_RANK) with the NCCL process group up: (device, rank, world size)."""
    lr = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(lr)
    dev = torch.device("cuda", lr)
    dist.init_process_group("nccl", device_id=dev)
    return dev, dist.get_rank(), dist.get_world_size()
