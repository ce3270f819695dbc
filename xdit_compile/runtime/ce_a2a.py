"""Ulysses all-to-all on the GPUs' copy engines, split into start and wait so compute runs in between.

    t = torch.ops.xdit.a2a_start(x, group_name, kind, slot)       # queues the transfers, returns at once
    ... independent compute (its matmuls keep every SM; the copy engines need none) ...
    y = torch.ops.xdit.a2a_wait([t], [x], group_name, kind, slot) # the current stream waits for them

Head chunks (chunk c of C, compile.ulysses_chunks): a q/k/v start sends only the local heads of chunk c, its
wait returns (B, h/C, L, D); an "o" start sends one chunk's attention output and one "o" wait takes all C
tokens and returns the whole (B, H, S, D).

kind "q", "k", "v" (scatter heads, gather the sequence): x (B, H, S, D) -> y (B, H/N, N*S, D)
kind "o"           (scatter the sequence, gather heads): x (B, h, L, D) -> y (B, h*N, L/N, D)
Same values as the all_to_all_single pair of decompose_ulysses; N = group size, this rank's tokens are its
shard of the sequence (all shards equal).

Why: NCCL's all-to-all and xdit.symm_all_to_all move data with SM kernels, which wait while a matmul holds
every SM: beside a matmul they hide ~0.02-0.3 of their time. cudaMemcpy into a peer's symmetric-memory buffer
runs on a copy engine and hides 0.8-1.0 (`benchmarks/results/ce_overlap.md`). decompose_ulysses emits these
ops with compile.all_to_all = "copy_engine" and passes/schedule_transfers.py puts independent compute between
start and wait.

How (GPU path): every (group, kind, slot, shape) has a receive buffer in torch symmetric memory, laid out as
its consumer reads it: q/k/v as (B, L, h, D) (SDPA takes the (B, h, L, D) transposed view, no copy), o as
(B, S, H, D) (the out projection reads (B, S, H * D), no copy). Rank r's piece for rank j is one 2-D copy
(S rows of h * D elements; cuMemcpy2DAsync, copy engine) straight into j's buffer at r's rows (q/k/v) or
r's heads (o), from x in (B, S, H, D) / (B, L, h, D) memory order (what the projection / SDPA produce; other
strides are copied into that order first). One stream per destination, then a signal-pad barrier on a side
stream (every peer's pieces have landed), then an event the wait makes the current stream wait on. CUDA
graphs capture all of it (fork / join through events, memcpy nodes, the barrier kernel).

The wait returns a VIEW of the receive buffer, so it must be consumed before the buffer is written again.
Slots alternate per attention (decompose_ulysses gives attention i slot i % 2) and a peer writes a buffer
only after it passed the barrier of an earlier transfer that this rank entered after consuming the buffer's
previous contents: q/k/v of attention i are read by its SDPA, which precedes the start of its o transfer;
o of attention i is read by what follows attention i, which precedes the q/k/v starts of attention i + 1
(they depend on it) — and a rank starts the next transfer only after waiting for the one in between.
The wait also takes what the starts read (xs), so it stays allocated until the copies that read it are done.

Memory: 2 slots x (q, k, v, o) receive buffers per shape, kept for the process (FLUX 1024² on 4 ranks: 8 x 7 MB;
Wan 480p: 8 x 84 MB); a new resolution adds its own set (allocated collectively, the same on every rank).

Fallback (CPU / gloo, GPUs without peer access, a torch without symmetric memory, XDIT_CE_A2A=0): the start
runs ``dist.all_to_all_single`` and fills the same buffer (a plain tensor), the wait returns the same view;
no overlap, same layout and values. The barrier waits at most ``XDIT_TIMEOUT_S`` (300 s), then traps.
"""
from __future__ import annotations

import ctypes
import os

import torch
import torch.distributed as dist
from torch import Tensor

from .symm_a2a import _in_side_thread, _timeout_ms

__all__ = ["available", "a2a_start", "a2a_wait", "out_shape"]

KINDS = ("q", "k", "v", "o")
_BUFS: dict = {}      # (group, kind, slot, shape, dtype, device) -> receive buffer state
_PENDING: dict = {}   # (group, kind, slot, chunk) -> (event, what the copies read, kept until the wait)
_STREAMS: dict = {}   # (device, group size) -> (per-destination streams, side stream)
_OK: dict = {}
_CUDA = None


def out_shape(kind: str, shape, n: int, chunks: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, memory shape) of the whole received tensor, from the shape of what one start sends (for "o"
    with head chunks: one chunk's (B, h/C, L, D)); the result is memory.transpose(1, 2)."""
    b, h, s, d = shape
    if kind == "o":
        return (b, h * chunks * n, s // n, d), (b, s // n, h * chunks * n, d)
    return (b, h // n, s * n, d), (b, s * n, h // n, d)


class _Memcpy2D(ctypes.Structure):
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


def _cuda():
    """cuMemcpy2DAsync from the driver library (what every CUDA process has loaded)."""
    global _CUDA
    if _CUDA is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemcpy2DAsync_v2
        fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _CUDA = fn
    return _CUDA


def _memcpy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
    p = _Memcpy2D()
    p.srcMemoryType = p.dstMemoryType = 2        # CU_MEMORYTYPE_DEVICE
    p.srcDevice, p.srcPitch, p.dstDevice, p.dstPitch = src, spitch, dst, dpitch
    p.WidthInBytes, p.Height = width, height
    err = _cuda()(ctypes.byref(p), ctypes.c_void_p(stream.cuda_stream))
    if err:
        raise RuntimeError(f"xdit.a2a_start: cuMemcpy2DAsync failed with CUresult {err}")


def available(group_name: str, device: torch.device) -> bool:
    """Whether the copy-engine path runs for this group on this device (else the all_to_all_single fallback)."""
    key = (group_name, str(device))
    if key not in _OK:
        ok = device.type == "cuda" and os.environ.get("XDIT_CE_A2A", "1") != "0"
        if ok:
            try:
                from . import symm_a2a
                ok = symm_a2a.available(group_name, device, need_triton=False)
                _cuda()
            except Exception:  # noqa: BLE001
                ok = False
        _OK[key] = ok
    return _OK[key]


def _buffer(group_name: str, kind: str, slot: int, mem_shape, x: Tensor, ce: bool) -> dict:
    key = (group_name, kind, slot, tuple(mem_shape), x.dtype, x.device)
    st = _BUFS.get(key)
    if st is None:
        def make():
            if not ce:
                return {"buf": torch.empty(mem_shape, dtype=x.dtype, device=x.device)}
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(*mem_shape, dtype=x.dtype, device=x.device)
            hdl = symm_mem.rendezvous(buf, group_name)
            off = buf.data_ptr() - hdl.buffer_ptrs[hdl.rank]
            return {"buf": buf, "hdl": hdl, "ptrs": [p + off for p in hdl.buffer_ptrs]}
        # outside the CUDA-graph warm-up's memory pool (see symm_a2a._state)
        st = _BUFS[key] = _in_side_thread(make, x.device) if x.is_cuda else make()
    return st


def _streams(device: torch.device, n: int):
    st = _STREAMS.get((device, n))
    if st is None:
        st = _STREAMS[(device, n)] = ([torch.cuda.Stream(device) for _ in range(n)], torch.cuda.Stream(device))
    return st


def _check(x: Tensor, kind: str, n: int, chunk: int, chunks: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"xdit.a2a_start: kind {kind!r} is not one of {KINDS}")
    if x.dim() != 4:
        raise ValueError(f"xdit.a2a_start: x must be (B, H, S, D), got shape {tuple(x.shape)}")
    split = x.shape[2] if kind == "o" else x.shape[1]
    if split % n:
        what = "sequence" if kind == "o" else "heads"
        raise ValueError(f"xdit.a2a_start: {what} ({split}) not divisible by the group size {n}")
    if chunks < 1 or not 0 <= chunk < chunks or (kind != "o" and (x.shape[1] // n) % chunks):
        raise ValueError(f"xdit.a2a_start: chunk {chunk} of {chunks} does not cut the {x.shape[1] // n} local "
                         "heads evenly")


@torch.library.custom_op("xdit::a2a_start", mutates_args=())
def a2a_start(x: Tensor, group_name: str, kind: str, slot: int, chunk: int = 0, chunks: int = 1) -> Tensor:
    """Queue the all-to-all of x (q/k/v: the heads of head chunk `chunk` only; o: x is that chunk's attention
    output); returns a token for a2a_wait (an empty tensor)."""
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    n, me = pg.size(), pg.rank()
    _check(x, kind, n, chunk, chunks)
    shape, mem_shape = out_shape(kind, x.shape, n, chunks)
    ce = available(group_name, x.device) and n > 1
    st = _buffer(group_name, kind, slot, mem_shape, x, ce)
    xt = x.transpose(1, 2).contiguous()      # (B, S, H, D) for q/k/v, (B, L, hc, D) for o: no copy when it already is
    b, d = xt.shape[0], xt.shape[3]
    if kind == "o":
        rows, h = shape[2], mem_shape[2] // n            # tokens per piece, local heads of the whole output
        hc = h // chunks
    else:
        rows, h = x.shape[2], mem_shape[2]
        hc = h // chunks
    if not ce:
        buf = st["buf"]
        if kind == "o":      # pieces = sequence slices of this chunk: (N, B, S', hc, D)
            send = xt.unflatten(1, (n, -1)).transpose(0, 1).contiguous()
        else:                # pieces = head chunk c of every rank's head group: (N, B, S, hc, D)
            send = xt.unflatten(2, (n, chunks, -1))[:, :, :, chunk].permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=pg)   # recv[P] = rank P's piece for this rank
        if kind == "o":      # (B, S', H, D) with H = (P, C, hc)
            buf.unflatten(2, (n, chunks, hc))[:, :, :, chunk].copy_(recv.permute(1, 2, 0, 3, 4))
        else:                # (B, L, h, D) with L = (P, S), h = (C, hc)
            buf.unflatten(2, (chunks, hc))[:, :, chunk].copy_(recv.transpose(0, 1).flatten(1, 2))
        return x.new_empty(0)
    e = x.element_size()
    width = hc * d * e                                  # one token's piece, bytes
    streams, side = _streams(x.device, n)
    cur = torch.cuda.current_stream(x.device)
    ev_in = cur.record_event()
    for j in range(n):
        sj = streams[j]
        sj.wait_event(ev_in)
        for bi in range(b):
            if kind == "o":   # my tokens [j*S', (j+1)*S') of chunk c -> rank j's (B, S', H, D) at heads me*h + c*hc
                src = xt.data_ptr() + ((bi * xt.shape[1] + j * rows) * hc * d) * e
                spitch = width
                dst = st["ptrs"][j] + ((bi * rows * n * h) * d + (me * h + chunk * hc) * d) * e
                dpitch = n * h * d * e
            else:             # heads j*h + c*hc .. of my S tokens -> rank j's (B, L, h, D) at tokens me*S, heads c*hc
                src = xt.data_ptr() + ((bi * rows * n * h) * d + (j * h + chunk * hc) * d) * e
                spitch = n * h * d * e
                dst = st["ptrs"][j] + ((bi * n * rows + me * rows) * h * d + chunk * hc * d) * e
                dpitch = h * d * e
            _memcpy2d(dst, dpitch, src, spitch, width, rows, sj)
        side.wait_stream(sj)
    with torch.cuda.stream(side):
        st["hdl"].barrier(channel=0, timeout_ms=_timeout_ms())
    ev_done = side.record_event()
    _PENDING[(group_name, kind, slot, chunk)] = (ev_done, xt)
    return x.new_empty(0)


@a2a_start.register_fake
def _(x: Tensor, group_name: str, kind: str, slot: int, chunk: int = 0, chunks: int = 1) -> Tensor:
    return x.new_empty(0)


@torch.library.custom_op("xdit::a2a_wait", mutates_args=())
def a2a_wait(tokens: list[Tensor], xs: list[Tensor], group_name: str, kind: str, slot: int, chunk: int = 0,
             chunks: int = 1) -> Tensor:
    """The result of the a2a_starts with the same (group, kind, slot), as a view of their receive buffer:
    q/k/v: head chunk `chunk` (B, h/C, L, D); o: every chunk (tokens and xs: one per chunk), (B, H, S, D).
    xs are the tensors the starts read (kept alive until here)."""
    n = dist.distributed_c10d._resolve_process_group(group_name).size()
    x = xs[0]
    _, mem_shape = out_shape(kind, x.shape, n, chunks)
    for c in (range(chunks) if kind == "o" else (chunk,)):
        pending = _PENDING.pop((group_name, kind, slot, c), None)
        if pending is not None:
            torch.cuda.current_stream(x.device).wait_event(pending[0])
    st = _BUFS.get((group_name, kind, slot, tuple(mem_shape), x.dtype, x.device))
    if st is None:
        raise RuntimeError(f"xdit.a2a_wait({kind!r}, slot {slot}) without its a2a_start")
    buf = st["buf"]
    if kind != "o" and chunks > 1:
        hc = mem_shape[2] // chunks
        buf = buf[:, :, chunk * hc:(chunk + 1) * hc]
    return buf.transpose(1, 2)


@a2a_wait.register_fake
def _(tokens: list[Tensor], xs: list[Tensor], group_name: str, kind: str, slot: int, chunk: int = 0,
      chunks: int = 1) -> Tensor:
    n = dist.distributed_c10d._resolve_process_group(group_name).size() if dist.is_initialized() else 1
    _, mem_shape = out_shape(kind, xs[0].shape, n, chunks)
    buf = xs[0].new_empty(mem_shape)
    if kind != "o" and chunks > 1:
        hc = mem_shape[2] // chunks
        buf = buf[:, :, chunk * hc:(chunk + 1) * hc]
    return buf.transpose(1, 2)
