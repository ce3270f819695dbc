"""All-to-all through symmetric memory: one Triton kernel stores every rank's pieces straight into the peers'
buffers over NVLink, a signal-pad barrier, a local copy out. A custom op, so Inductor lowers it as an opaque
call and CUDA graphs capture it (kernels only, no host synchronisation).

    y = torch.ops.xdit.symm_all_to_all(x, group_name)    # x (N, ...) contiguous; y[j] = rank j's x[rank]

Same result as ``all_to_all_single(y, x, group=pg)`` with even splits. Why: NCCL's all-to-all moves a FLUX
block's q/k/v (21 MB per rank at 1024², 4 x H100/H200) in ~120 us and its 7 MB output in ~100 us (about
half the NVLink rate, a large fixed cost: `benchmarks/results/a2a_bw.md`); Ulysses issues two per block.

Buffers: two symmetric buffers per (group, device, byte size), used alternately. A rank's stores into a
peer's buffer for round m start after the barrier of round m - 1 (stream order), which every peer enters only
after copying out round m - 2: so the buffer it writes was consumed. Consecutive rounds of different sizes are
separated by a barrier as well. Buffers are allocated and exchanged (``rendezvous``, collective) on the first
call of each size, which under Inductor's CUDA graphs is the eager warm-up before capture.

Measured in a CUDA graph on 4 x H200 (`benchmarks/a2a_bw.py`): 7 MB 51 us (NCCL 86), 21 MB 115 us (NCCL 128),
28 MB 154 (NCCL 143), 78 MB 422 (NCCL 317): the stores reach ~140 GB/s, NCCL's bandwidth is higher and its
fixed cost larger, so sends above ``XDIT_SYMM_A2A_MAX_MB`` (24 MB) go to NCCL inside the op.

Where symmetric memory is not available (CPU / gloo, a torch without it, no P2P between the GPUs) the op falls
back to ``dist.all_to_all_single``; ``available(group_name, device)`` says which path runs. The barrier waits at
most ``XDIT_TIMEOUT_S`` (300 s), then the kernel traps, so a dead peer ends the run instead of hanging it.
"""
from __future__ import annotations

import os
import threading

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["available", "symm_all_to_all"]

_STATE: dict = {}
_OK: dict = {}

try:  # Triton is optional (CPU-only installs may lack it); without it the op uses NCCL / gloo
    import triton
    import triton.language as tl

    @triton.jit
    def _push_kernel(x_ptr, ptrs_ptr, dst_off, chunk, NUM_RANKS: tl.constexpr, BLOCK: tl.constexpr):
        # row j of x (chunk elements) -> rank j's buffer at element dst_off (this rank's slot)
        # destination rank fastest: the programs running at once store to every peer, not one peer at a time
        j = tl.program_id(0) % NUM_RANKS
        pid = tl.program_id(0) // NUM_RANKS
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < chunk
        vals = tl.load(x_ptr + j.to(tl.int64) * chunk + offs, mask=mask)
        base = tl.load(ptrs_ptr + j).to(tl.pointer_type(x_ptr.dtype.element_ty))
        tl.store(base + dst_off + offs, vals, mask=mask)
except ImportError:  # pragma: no cover
    triton = None


def _timeout_ms() -> int:
    raw = os.environ.get("XDIT_TIMEOUT_S", "300")
    try:
        return max(1, int(float(raw) * 1000))
    except ValueError:
        return 300_000


def _max_bytes() -> int:
    """Above this send size (XDIT_SYMM_A2A_MAX_MB, default 24) NCCL's all-to-all is as fast or faster."""
    return int(float(os.environ.get("XDIT_SYMM_A2A_MAX_MB", "24")) * 2**20)


def available(group_name: str, device: torch.device, need_triton: bool = True) -> bool:
    """Whether symm_all_to_all takes the symmetric-memory path for this group on this device (need_triton=False:
    whether symmetric memory between all the group's GPUs works, for ce_a2a)."""
    key = (group_name, str(device), need_triton)
    if key not in _OK:
        ok = device.type == "cuda" and (triton is not None and os.environ.get("XDIT_SYMM_A2A", "1") != "0"
                                        or not need_triton)
        if ok:
            try:
                import torch.distributed._symmetric_memory as symm_mem  # noqa: F401
                pg = dist.distributed_c10d._resolve_process_group(group_name)
                if dist.get_backend(pg) == "fake":   # one process standing for a rank: no peers to map
                    raise RuntimeError("fake process group")
                ranks = dist.get_process_group_ranks(pg)
                me = torch.cuda.current_device()
                # every peer GPU of this node must be reachable by loads / stores (NVLink or PCIe P2P)
                ok = dist.get_world_size() <= torch.cuda.device_count() and all(
                    torch.cuda.can_device_access_peer(me, r % torch.cuda.device_count())
                    for r in ranks if r % torch.cuda.device_count() != me)
            except Exception:  # noqa: BLE001
                ok = False
        _OK[key] = ok
    return _OK[key]


def _state(group_name: str, x: Tensor):
    key = (group_name, x.device, x.dtype, x.numel())
    st = _STATE.get(key)
    if st is None:
        st = _STATE[key] = _in_side_thread(lambda: _allocate(group_name, x), x.device)
    return st


def reserve(specs: list[tuple]) -> int:
    """Make the buffers of the calls a graph will make, (group, numel, dtype, device) each, before it first runs
    and in one order on every rank, so no rendezvous happens inside a run (see ce_a2a.reserve). Only where the
    call takes the symmetric-memory path. Returns how many were made."""
    made = 0
    for group_name, numel, dtype, device in dict.fromkeys(specs):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        n = dist.distributed_c10d._resolve_process_group(group_name).size()
        size = numel * torch.empty((), dtype=dtype).element_size()
        if n > 1 and available(group_name, device) and size <= _max_bytes():
            _state(group_name, torch.empty(numel, dtype=dtype, device=device))
            made += 1
    return made


def _in_side_thread(fn, device: torch.device):
    """fn() run in another thread (its result, or its exception re-raised here). Under Inductor's CUDA graphs
    the first call is the warm-up, and what this thread allocated then would land in the graph's private memory
    pool, which must hold only tensors the graph returns ("tensors in the cudagraph pool not tracked as
    outputs"); buffers that outlive the call are made elsewhere."""
    box: dict = {}

    def work():
        try:
            torch.cuda.set_device(device)
            box["out"] = fn()
            torch.cuda.synchronize(device)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
            box["err"] = e

    t = threading.Thread(target=work, name="xdit-symm-alloc")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def _allocate(group_name: str, x: Tensor) -> dict:
    import torch.distributed._symmetric_memory as symm_mem
    bufs, hdls, ptrs = [], [], []
    for _ in range(2):
        buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
        hdl = symm_mem.rendezvous(buf, group_name)
        offset_bytes = buf.data_ptr() - hdl.buffer_ptrs[hdl.rank]
        bufs.append(buf)
        hdls.append(hdl)
        ptrs.append((torch.tensor(hdl.buffer_ptrs, dtype=torch.int64, device=x.device),
                     offset_bytes // x.element_size()))
    return {"bufs": bufs, "hdls": hdls, "ptrs": ptrs, "next": 0}


@torch.library.custom_op("xdit::symm_all_to_all", mutates_args=())
def symm_all_to_all(x: Tensor, group_name: str) -> Tensor:
    """x (N, ...) with N = group size; returns y (N, ...) with y[j] = x[rank] of rank j."""
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    n = pg.size()
    if x.size(0) != n:
        raise ValueError(f"symm_all_to_all: x has {x.size(0)} rows, the group has {n} ranks")
    x = x.contiguous()
    if n == 1:
        return x.clone()
    if not available(group_name, x.device) or x.numel() * x.element_size() > _max_bytes():
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=pg)
        return y
    st = _state(group_name, x)
    i = st["next"]
    st["next"] = 1 - i
    hdl, buf = st["hdls"][i], st["bufs"][i]
    ptrs, offset = st["ptrs"][i]
    chunk = x.numel() // n
    block = 4096
    _push_kernel[(triton.cdiv(chunk, block) * n,)](x, ptrs, offset + hdl.rank * chunk, chunk, NUM_RANKS=n,
                                                   BLOCK=block, num_warps=8)
    hdl.barrier(channel=i, timeout_ms=_timeout_ms())
    return buf.view(x.shape).clone()


@symm_all_to_all.register_fake
def _(x: Tensor, group_name: str) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)
