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

In-place kinds "qi", "ki", "vi", "oi" (compile.ce_in_place, runtime/ce_in_place.py): the same transfers of q, k, v
and the output, but the receive buffer is the whole (B, L, H, D) and the producer has written x into it where its
own piece belongs (q/k/v: this rank's rows; o: this rank's heads), so the start copies only the peers' pieces, each
to the same place in the peer's buffer (it copies the own piece too when x is elsewhere). The wait returns this
rank's heads of every row (qi/ki/vi: (B, h, L, D), strided) or its rows of every head (oi: (B, H, S', D)); it takes
no xs (x aliases its result): the start's token has x's shape. No head chunks. "qri" is "qr" (query parts, below) in
place: the rows rotated, so the producer writes its own rows into the last block.

Query parts (compile.query_parts = P, P divides N): the attention output goes back in P parts, each
sent as soon as its queries are attended, so the transfer of part p runs beside the attention of part p + 1.
kind "qr" is "q" with the sequence ROTATED per rank: block b of rank j's result holds the tokens of rank
(j + 1 + b) % N, so the last block is j's own and the block whose output goes out last needs no transfer (keys
and values keep their order: attention without a mask does not depend on the order of the keys). kind "op",
part p of P: x (B, h, L/P, D) is the attention output of blocks p * N/P .. (p + 1) * N/P - 1 of that rotated
sequence, sent to the ranks they belong to; one "op" wait takes every part and returns (B, h*N, L/N, D) like "o".

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
strides are copied into that order first). One stream per destination. A rank's own piece stays on its GPU,
where cuMemcpy2DAsync is the driver's copy kernel on the SMs, not a copy engine. It is shorter than the peers'
copies it runs beside (FLUX 2048² ulysses 2: ~32 against ~74 us), so where compute waits for a transfer it is off
the critical path; launched before a GEMM it delays that GEMM by ~5 us at FLUX 2048² ulysses 4, and neither a
Triton kernel nor a rank-major 1-D layout did better (benchmarks/results/session22/). XDIT_CE_LOCAL=triton copies
it with runtime/local_copy.py's kernel instead (opt-in; exact on 2 and 4 GPUs in benchmarks/ce_check.py, session 24).
A rank's peer copies do not overlap each other: in recorded ulysses-4 steps the three pieces of a transfer ran one
after another on the copy engine, ~3.7 us apart, at ~300 GB/s each (H100; benchmarks/trace_gaps.py,
benchmarks/results/session22/). Where nothing computes beside a transfer (a start with exposed=True: q's and the
output's transfers of FLUX's double blocks and Wan's self-attention, of the first / last head chunk),
XDIT_CE_SM_PEERS=k (opt-in, default 0) stores the pieces of the last k peers with runtime/local_copy.py's kernel
through the peers' mapped buffers instead, on the SMs, beside the copy engine's; completion is the same (the
barrier / flags follow the kernel on the piece's stream). ce_check.py found it exact on 2 and 4 GPUs (one peer and
every peer by SMs, session 24); its 4-GPU timing has not run.
Completion (XDIT_CE_SIGNAL):
- "barrier" (default): a signal-pad barrier kernel on a side stream (every peer's pieces have landed, times
  out after XDIT_TIMEOUT_S), then an event the wait makes the current stream wait on. The kernel needs an SM
  and makes each transfer a sync of all ranks. Faster than flags on 4 GPUs (FLUX 1024² ulysses 4, 4 x H100:
  40.5 against 42.2 ms/step), equal on 2 (2 x H200: 76.4 / 76.0). In a FLUX single block on 4 x H200 every
  copy had landed before proj_mlp ended, yet SDPA started ~45 us after it with flags, ~13 us with the barrier.
- "flag": after its copies, the stream to rank j writes 1 into j's flag for (kind, slot, chunk,
  this rank) with ``cuStreamWriteValue32`` (a memory fence first, so the data is visible before the flag).
  The wait makes the current stream wait for its own outgoing streams (events) and then, with one
  ``cuStreamBatchMemOp``, for every peer's flag to be 1 (``cuStreamWaitValue32``) and sets it back to 0.
  No SM work at all: the GPU front end waits, and a rank waits only for its senders' copies, not for every
  rank to finish the compute that overlaps them. The wait has no timeout; a dead rank ends the others
  through torchrun (its agent stops the group), a rank that skips a transfer would hang its peers.
- "spin": the flags as in "flag", waited for by a small Triton kernel on the compute stream at the wait
  (runtime/spin_wait.py), with the XDIT_TIMEOUT_S timeout: nothing spins beside compute (the barrier kernel
  holds an SM while the GEMMs between start and wait run; one H200: a spinning CTA beside GEMMs slowed them
  by 73-86%, benchmarks/results/session20/spin_gemm.md), and no front-end wait latency. Opt-in: on 2 x H200
  (FLUX 2048² ulysses 2) it was exact and no faster (348.2 against 347.6 ms/step with the barrier), and the
  GEMMs beside a barrier kernel in that step's trace were not slower; 4 GPUs not timed yet.
CUDA graphs capture all of it (fork / join through events, memcpy nodes, memop nodes or the barrier kernel).

The wait returns a VIEW of the receive buffer, so it must be consumed before the buffer is written again.
Slots alternate per attention (decompose_ulysses gives attention i slot i % 2) and a peer writes a buffer
only after it passed the barrier of an earlier transfer that this rank entered after consuming the buffer's
previous contents: q/k/v of attention i are read by its SDPA, which precedes the start of its o transfer;
o of attention i is read by what follows attention i, which precedes the q/k/v starts of attention i + 1
(they depend on it) — and a rank starts the next transfer only after waiting for the one in between (its
barrier, or the in-between flags: each written after the sender's copies, which its stream orders after
the sender consumed the buffer). The same argument covers the flags: a rank resets a flag at the wait, before
it starts the in-between transfer, and a peer sets it again only after it waited for that transfer.
The wait also takes what the starts read (xs), so it stays allocated until the copies that read it are done.

Memory: 2 slots x (q, k, v, o) receive buffers per shape, kept for the process (FLUX 1024² on 4 ranks: 8 x 7 MB;
Wan 480p: 8 x 84 MB); a new resolution adds its own set (allocated collectively, the same on every rank). The
backend makes a graph's buffers before the graph first runs (``reserve``, from the specs decompose_ulysses
records), so no rendezvous happens inside a run; a start that finds no buffer still makes one.

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

from .local_copy import copy2d
from .symm_a2a import _in_side_thread, _timeout_ms

__all__ = ["available", "a2a_start", "a2a_wait", "buffer_specs", "out_shape", "reserve"]

KINDS = ("q", "k", "v", "o", "qr", "op", "qi", "ki", "vi", "oi", "qri")
IN_PLACE = ("qi", "ki", "vi", "oi", "qri")
_BUFS: dict = {}      # (group, kind, slot, shape, dtype, device) -> receive buffer state
_PENDING: dict = {}   # (group, kind, slot, chunk) -> (events, what the copies read, flag addresses to wait on)
_FLAGS: dict = {}     # (group, kind, slot, chunks, device) -> completion flags (XDIT_CE_SIGNAL=flag)
_STREAMS: dict = {}   # (device, group size) -> (per-destination streams, side stream)
_OK: dict = {}
_CUDA = None


def out_shape(kind: str, shape, n: int, chunks: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, memory shape) of the whole received tensor, from the shape of what one start sends (for "o"
    with head chunks: one chunk's (B, h/C, L, D)); the result is memory.transpose(1, 2)."""
    b, h, s, d = shape
    if kind == "oi":         # the whole (B, L, H, D): this rank's rows are what it receives
        return (b, h * n, s // n, d), (b, s, h * n, d)
    if kind in ("qi", "ki", "vi", "qri"):  # the whole (B, L, H, D): this rank's heads are what it receives
        return (b, h // n, s * n, d), (b, s * n, h, d)
    if kind == "o":
        return (b, h * chunks * n, s // n, d), (b, s // n, h * chunks * n, d)
    if kind == "op":         # s = L / P tokens of one query part; chunks = P
        return (b, h * n, s * chunks // n, d), (b, s * chunks // n, h * n, d)
    return (b, h // n, s * n, d), (b, s * n, h // n, d)


class _Memcpy2D(ctypes.Structure):
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


class _MemOp(ctypes.Structure):
    """CUstreamBatchMemOpParams (a 48-byte union) as its waitValue / writeValue member."""
    _fields_ = [("operation", ctypes.c_uint), ("address", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint), ("alias", ctypes.c_uint64), ("pad", ctypes.c_uint64)]


_WAIT32, _WRITE32, _WAIT_EQ = 1, 2, 0x1          # CU_STREAM_MEM_OP_WAIT/WRITE_VALUE_32, CU_STREAM_WAIT_VALUE_EQ


def _driver_fn(lib, names, argtypes):
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
            return fn
    raise RuntimeError(f"libcuda has none of {names}")


def _cuda():
    """cuMemcpy2DAsync and the stream memory operations from the driver library (what every CUDA process has
    loaded)."""
    global _CUDA
    if _CUDA is None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u64, u32 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint
        _CUDA = {
            "memcpy2d": _driver_fn(lib, ["cuMemcpy2DAsync_v2"], [ctypes.POINTER(_Memcpy2D), vp]),
            "write32": _driver_fn(lib, ["cuStreamWriteValue32_v2", "cuStreamWriteValue32"], [vp, u64, u32, u32]),
            "batch": _driver_fn(lib, ["cuStreamBatchMemOp_v2", "cuStreamBatchMemOp"],
                                [vp, u32, ctypes.POINTER(_MemOp), u32]),
        }
    return _CUDA


def _check_cu(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"xdit.a2a: {what} failed with CUresult {err}")


def _signal_mode() -> str:
    mode = os.environ.get("XDIT_CE_SIGNAL", "barrier")
    if mode not in ("flag", "barrier", "spin"):
        raise ValueError(f"XDIT_CE_SIGNAL={mode!r}: use 'barrier' (the default, a barrier kernel), 'flag' "
                         "(stream memory operations) or 'spin' (flags set by memory operations, waited for by a "
                         "kernel on the compute stream)")
    return mode


def _local_mode() -> str:
    mode = os.environ.get("XDIT_CE_LOCAL", "driver")
    if mode not in ("driver", "triton"):
        raise ValueError(f"XDIT_CE_LOCAL={mode!r}: use 'driver' (the default: cuMemcpy2DAsync, which inside one GPU "
                         "is the driver's copy kernel) or 'triton' (runtime/local_copy.py's kernel)")
    return mode


def _sm_peers(n: int) -> int:
    """XDIT_CE_SM_PEERS: how many peers' pieces of an exposed transfer SM kernels store (see the module doc)."""
    raw = os.environ.get("XDIT_CE_SM_PEERS", "0")
    try:
        k = int(raw)
    except ValueError:
        k = -1
    if k < 0:
        raise ValueError(f"XDIT_CE_SM_PEERS={raw!r}: use a count of peers, 0 (the default: every piece on the copy "
                         "engine) up to the group size - 1")
    return min(k, n - 1)


def _memcpy2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
    p = _Memcpy2D()
    p.srcMemoryType = p.dstMemoryType = 2        # CU_MEMORYTYPE_DEVICE
    p.srcDevice, p.srcPitch, p.dstDevice, p.dstPitch = src, spitch, dst, dpitch
    p.WidthInBytes, p.Height = width, height
    _check_cu(_cuda()["memcpy2d"](ctypes.byref(p), ctypes.c_void_p(stream.cuda_stream)), "cuMemcpy2DAsync")


def _flags(group_name: str, kind: str, slot: int, chunks: int, n: int, device: torch.device) -> dict:
    """The (chunks, n) int32 flags in symmetric memory that peers set for (kind, slot): flags[c, p] = 1 when
    rank p's pieces of chunk c have landed here. Zeroed before the collective exchange, so before any peer
    can write them."""
    key = (group_name, kind, slot, chunks, device)
    st = _FLAGS.get(key)
    if st is None:
        st = _FLAGS[key] = _in_side_thread(lambda: symm_ints(group_name, chunks * n, device), device)
    return st


def symm_ints(group_name: str, size: int, device: torch.device, fill=None) -> dict:
    """{"flags": (size,) int32 in symmetric memory, "ptrs": every rank's address of it}: zeroed (then fill(flags), if
    given) before the rendezvous, so before any peer can write it. Run it in _in_side_thread."""
    import torch.distributed._symmetric_memory as symm_mem
    flags = symm_mem.empty(size, dtype=torch.int32, device=device).zero_()
    if fill is not None:
        fill(flags)
    torch.cuda.synchronize(device)
    hdl = symm_mem.rendezvous(flags, group_name)
    off = flags.data_ptr() - hdl.buffer_ptrs[hdl.rank]
    return {"flags": flags, "ptrs": [p + off for p in hdl.buffer_ptrs]}


def _wait_flags(addrs: list[int], stream) -> None:
    """On `stream`: wait until every int32 at addrs is 1, then set each back to 0 (one batch of memops)."""
    ops = (_MemOp * (2 * len(addrs)))()
    for i, a in enumerate(addrs):
        ops[2 * i].operation, ops[2 * i].address, ops[2 * i].value, ops[2 * i].flags = _WAIT32, a, 1, _WAIT_EQ
        ops[2 * i + 1].operation, ops[2 * i + 1].address = _WRITE32, a    # value 0, flags 0 (fence first)
    _check_cu(_cuda()["batch"](ctypes.c_void_p(stream.cuda_stream), len(ops), ops, 0), "cuStreamBatchMemOp")


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


def _state(group_name: str, kind: str, slot: int, mem_shape, dtype: torch.dtype, device: torch.device, ce: bool,
           pg) -> dict:
    """The receive buffer of (group, kind, slot, shape). Under torch's fake process group (one process standing for a
    rank, profile_step.py --fake-world) the peers' pieces never arrive: left as fresh device memory (zeros), the
    rank's attention and GEMMs ran ~10% fast (benchmarks/results/session24/: most likely less power on zeros under
    the GPU's power cap). So there the buffer starts out holding activation-like values, once, when it is first
    used (before any CUDA-graph capture: a warm-up run comes first), before a producer writes into it in place."""
    st = _buffer(group_name, kind, slot, mem_shape, dtype, device, ce)
    if not ce and not st.get("filled"):
        if dist.get_backend(pg) == "fake":
            st["buf"].normal_()
        st["filled"] = True
    return st


def _own_view(buf: Tensor, kind: str, n: int, me: int) -> Tensor:
    """Where this rank's producer writes in an in-place kind's (B, L, H, D) buffer: qi / ki / vi its tokens' rows
    (B, S, H, D), whose own heads are its own piece; oi its heads (B, L, h, D), whose own rows are its own piece."""
    if kind == "oi":
        h = buf.shape[2] // n
        return buf[:, :, me * h:(me + 1) * h]
    s, blk = buf.shape[1] // n, n - 1 if kind == "qri" else me     # qri: rotated, the own block last
    return buf[:, blk * s:(blk + 1) * s]


def in_place_out(group_name: str, kind: str, slot: int, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """For a producer of an in-place kind: the view of the receive buffer its output goes to, in the shape a2a_start
    will get it: qi / ki / vi (B, S, H, D) (q / k / v before the transpose: x.transpose(1, 2) is what the start
    takes), oi (B, h, L, D) (the attention output, a transposed view of (B, L, h, D) rows)."""
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    n, me = pg.size(), pg.rank()
    if kind not in IN_PLACE:
        raise ValueError(f"xdit.a2a in_place_out: kind {kind!r} is not one of {IN_PLACE}")
    x_shape = tuple(shape) if kind == "oi" else (shape[0], shape[2], shape[1], shape[3])   # as the start gets it
    _, mem_shape = out_shape(kind, x_shape, n)
    ce = available(group_name, device) and n > 1
    own = _own_view(_state(group_name, kind, slot, mem_shape, dtype, device, ce, pg)["buf"], kind, n, me)
    return own.transpose(1, 2) if kind == "oi" else own


def _in_place_piece(xt: Tensor, kind: str, n: int, me: int, j: int, bi: int, dst_base: int, e: int):
    """(src, src pitch, dst, dst pitch, width, rows), pointers and bytes, of my piece for rank j in batch row bi of
    an in-place kind: it lands in rank j's buffer where it sits in mine (when the producer wrote it in place)."""
    b_, r_, c_, d = xt.shape
    if kind == "oi":    # xt (B, L, h, D): rows j*S' of my heads -> rank j's rows j*S' at heads me*h
        rows, h, big_h, big_l = r_ // n, c_, c_ * n, r_
        src = xt.data_ptr() + (bi * xt.stride(0) + j * rows * xt.stride(1)) * e
        dst = dst_base + ((bi * big_l + j * rows) * big_h + me * h) * d * e
    else:               # xt (B, S, H, D): heads j*h of my rows -> rank j's rows me*S (qri: its block for me), heads j*h
        rows, h, big_h, big_l = r_, c_ // n, c_, r_ * n
        blk = (me - j - 1) % n if kind == "qri" else me
        src = xt.data_ptr() + (bi * xt.stride(0) + j * h * d) * e
        dst = dst_base + ((bi * big_l + blk * rows) * big_h + j * h) * d * e
    return src, xt.stride(1) * e, dst, big_h * d * e, h * d * e, rows


def _own_piece_in_place(buf: Tensor, xt: Tensor, kind: str, n: int, me: int) -> None:
    """Under a fake group, a producer that did not write in place: only its own piece, where it belongs."""
    own = _own_view(buf, kind, n, me)
    if kind == "oi":
        own.unflatten(1, (n, -1))[:, me].copy_(xt.unflatten(1, (n, -1))[:, me])
    else:
        own.unflatten(2, (n, -1))[:, :, me].copy_(xt.unflatten(2, (n, -1))[:, :, me])


def _fallback_in_place(buf: Tensor, xt: Tensor, kind: str, n: int, me: int, pg) -> None:
    """An in-place kind's transfer with dist.all_to_all_single: the peers' pieces into this rank's part of buf."""
    if kind == "oi":   # xt (B, L, h, D): rank j's rows go to rank j
        send = xt.unflatten(1, (n, -1)).transpose(0, 1).contiguous()             # (N, B, S', h, D)
    else:              # xt (B, S, H, D): rank j's heads go to rank j
        send = xt.unflatten(2, (n, -1)).permute(2, 0, 1, 3, 4).contiguous()      # (N, B, S, h, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=pg)   # recv[P] = rank P's piece for this rank
    if kind == "oi":   # my rows, rank P's heads
        buf.unflatten(1, (n, -1))[:, me].unflatten(2, (n, -1)).copy_(recv.permute(1, 2, 0, 3, 4))
    else:              # rank P's rows, my heads (qri: block b holds rank me + 1 + b's)
        if kind == "qri":
            recv = recv[[(me + 1 + b) % n for b in range(n)]]
        buf.unflatten(2, (n, -1))[:, :, me].unflatten(1, (n, -1)).copy_(recv.transpose(0, 1))


def _buffer(group_name: str, kind: str, slot: int, mem_shape, dtype: torch.dtype, device: torch.device,
            ce: bool) -> dict:
    key = (group_name, kind, slot, tuple(mem_shape), dtype, device)
    st = _BUFS.get(key)
    if st is None:
        def make():
            if not ce:
                return {"buf": torch.empty(mem_shape, dtype=dtype, device=device)}
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(*mem_shape, dtype=dtype, device=device)
            hdl = symm_mem.rendezvous(buf, group_name)
            off = buf.data_ptr() - hdl.buffer_ptrs[hdl.rank]
            return {"buf": buf, "hdl": hdl, "ptrs": [p + off for p in hdl.buffer_ptrs]}
        # outside the CUDA-graph warm-up's memory pool (see symm_a2a._state)
        st = _BUFS[key] = _in_side_thread(make, device) if device.type == "cuda" else make()
    return st


def buffer_specs(group_name: str, n: int, q_shape, dtype: torch.dtype, device: torch.device, slot: int,
                 chunks: int = 1, parts: int = 1, in_place=()) -> list[tuple]:
    """The receive buffers one decomposed attention's starts use (decompose_ulysses records them): q_shape is
    this rank's (B, H, S, D) of q, k and v; in_place: the in-place kinds it uses instead of their plain ones (qi for
    q, ...); the same keys a2a_start computes, and the chunk count of their flags."""
    b, heads, s, d = q_shape

    def kind(base: str) -> str:
        return base + "i" if base + "i" in in_place else base
    xs = [(kind("v"), q_shape, chunks), (kind("k"), q_shape, chunks),
          (("qri" if "qri" in in_place else "qr") if parts > 1 else kind("q"), q_shape, chunks)]
    if parts > 1:
        xs.append(("op", (b, heads // n, n * s // parts, d), parts))
    else:
        xs.append((kind("o"), (b, heads // n // chunks, n * s, d), chunks))
    return [(group_name, kind, slot, out_shape(kind, shape, n, c)[1], dtype, device, 1 if kind == "op" else c)
            for kind, shape, c in xs]


def reserve(specs: list[tuple]) -> list[tuple]:
    """Make the receive buffers of `specs` now (the backend calls this after the passes, before the graph first
    runs, in the graph's order: the same on every rank). A buffer made lazily by the first a2a_start is a host
    collective (a rendezvous) inside the first run, where a rank can also be blocked on its own GPU (Inductor's
    autotuning synchronizes): Wan 480p at ulysses 4 deadlocked that way on 4 x H100. With XDIT_CE_SIGNAL=flag
    the flags too. Returns the keys made."""
    made = []
    flag = _signal_mode() in ("flag", "spin")
    for group_name, kind, slot, mem_shape, dtype, device, flag_chunks in dict.fromkeys(specs):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        n = dist.distributed_c10d._resolve_process_group(group_name).size()
        ce = available(group_name, device) and n > 1
        _buffer(group_name, kind, slot, mem_shape, dtype, device, ce)
        if kind.startswith("ring_"):     # runtime/ce_ring.py's k / v buffers: its own flags
            if ce:
                from .ce_ring import _ring_flags
                _ring_flags(group_name, n, device)
        elif ce and flag:
            _flags(group_name, kind, slot, flag_chunks, n, device)
        made.append((group_name, kind, slot, tuple(mem_shape), dtype, device))
    return made


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
    if kind == "op":
        if chunks < 1 or n % chunks or not 0 <= chunk < chunks or x.shape[2] % (n // chunks):
            raise ValueError(f"xdit.a2a_start: query part {chunk} of {chunks}: the parts must divide the group size "
                             f"{n} and a part's {x.shape[2]} tokens into {max(1, n // max(chunks, 1))} rank blocks")
        return
    if kind in ("qr", *IN_PLACE) and chunks != 1:
        raise ValueError(f"xdit.a2a_start: kind {kind!r} takes no head chunks")
    split = x.shape[2] if kind in ("o", "oi") else x.shape[1]
    if split % n:
        what = "sequence" if kind in ("o", "oi") else "heads"
        raise ValueError(f"xdit.a2a_start: {what} ({split}) not divisible by the group size {n}")
    if chunks < 1 or not 0 <= chunk < chunks or (kind != "o" and (x.shape[1] // n) % chunks):
        raise ValueError(f"xdit.a2a_start: chunk {chunk} of {chunks} does not cut the {x.shape[1] // n} local "
                         "heads evenly")


@torch.library.custom_op("xdit::a2a_start", mutates_args=())
def a2a_start(x: Tensor, group_name: str, kind: str, slot: int, chunk: int = 0, chunks: int = 1,
              after: Tensor | None = None, exposed: bool = False) -> Tensor:
    """Queue the all-to-all of x (q/k/v: the heads of head chunk `chunk` only; o: x is that chunk's attention
    output; qr: q, rotated; op: x is query part `chunk` of `chunks`); returns a token for a2a_wait (an empty
    tensor). `after`: the previous start's token, unused here; it only orders the starts the same on every
    rank (schedule_transfers chains them), since starts allocate buffers collectively and queue barriers.
    `exposed`: no compute runs beside this transfer (decompose_ulysses knows), so XDIT_CE_SM_PEERS may put SM
    kernels on it."""
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    n, me = pg.size(), pg.rank()
    _check(x, kind, n, chunk, chunks)
    flag = _signal_mode() in ("flag", "spin")     # checked on every path, so a bad XDIT_CE_SIGNAL fails on CPU too
    local = _local_mode()
    sm = _sm_peers(n) * exposed         # read on every path, so a bad XDIT_CE_SM_PEERS fails on CPU too
    shape, mem_shape = out_shape(kind, x.shape, n, chunks)
    ce = available(group_name, x.device) and n > 1
    st = _state(group_name, kind, slot, mem_shape, x.dtype, x.device, ce, pg)
    in_place = kind in IN_PLACE
    if in_place:             # (B, S, H, D) / (B, L, h, D), any row pitch: in place it is a view of the buffer
        xt = x.transpose(1, 2)
        if xt.stride(3) != 1 or xt.stride(2) != xt.shape[3]:
            xt = xt.contiguous()
        own = _own_view(st["buf"], kind, n, me)
        written = xt.data_ptr() == own.data_ptr() and xt.stride() == own.stride()   # the producer wrote it there
    else:
        xt = x.transpose(1, 2).contiguous()  # (B, S, H, D) for q/k/v, (B, L, hc, D) for o: no copy when it already is
    b, d = xt.shape[0], xt.shape[3]
    per = n // chunks if kind == "op" else n                 # rank blocks in x (op: in one query part)
    dests = [(me + 1 + chunk * per + i) % n for i in range(per)] if kind == "op" else list(range(n))
    if kind in ("o", "op"):
        rows, h = shape[2], mem_shape[2] // n            # tokens per piece, local heads of the whole output
        hc = h // chunks if kind == "o" else h
    else:
        rows, h = x.shape[2], mem_shape[2]
        hc = h // chunks
    if not ce:
        if dist.get_backend(pg) == "fake":   # one process standing for a rank (profile_step.py --fake-world)
            if in_place:
                if not written:
                    _own_piece_in_place(st["buf"], xt, kind, n, me)
            else:
                _own_piece(st["buf"], xt, kind, chunk, chunks, n, me, hc)
        elif in_place:
            _fallback_in_place(st["buf"], xt, kind, n, me, pg)
        else:
            _fallback(st["buf"], xt, kind, chunk, chunks, n, me, hc, pg, (group_name, slot))
        return _token(x, kind)
    e = x.element_size()
    width = hc * d * e                                  # one token's piece, bytes
    streams, side = _streams(x.device, n)
    fchunk, fchunks = (0, 1) if kind == "op" else (chunk, chunks)   # op: one piece from each peer, in some part
    fl = _flags(group_name, kind, slot, fchunks, n, x.device) if flag else None
    cur = torch.cuda.current_stream(x.device)
    ev_in = cur.record_event()
    events = []
    peers = [j for j in dests if j != me]
    by_sm = set(peers[len(peers) - sm:]) if sm else set()     # the copy engine would take these last
    for i, j in enumerate(dests):
        sj = streams[j]
        sj.wait_event(ev_in)
        for bi in range(b):
            if in_place:
                if j == me and written:
                    continue
                src, spitch, dst, dpitch, width, rows = _in_place_piece(xt, kind, n, me, j, bi, st["ptrs"][j], e)
            elif kind == "o":   # my tokens [j*S', (j+1)*S') of chunk c -> rank j's (B, S', H, D) at heads me*h + c*hc
                src = xt.data_ptr() + ((bi * xt.shape[1] + j * rows) * hc * d) * e
            elif kind == "op":  # block i of this part (rank j's tokens) -> rank j's (B, S', H, D) at heads me*h
                src = xt.data_ptr() + ((bi * xt.shape[1] + i * rows) * hc * d) * e
            else:             # heads j*h + c*hc .. of my S tokens -> rank j's (B, L, h, D) at block me (qr: rotated)
                src = xt.data_ptr() + ((bi * rows * n * h) * d + (j * h + chunk * hc) * d) * e
            if in_place:
                pass
            elif kind in ("o", "op"):
                spitch = width
                hoff = me * h + (chunk * hc if kind == "o" else 0)
                dst = st["ptrs"][j] + ((bi * rows * n * h) * d + hoff * d) * e
                dpitch = n * h * d * e
            else:
                spitch = n * h * d * e
                blk = (me - j - 1) % n if kind == "qr" else me
                dst = st["ptrs"][j] + ((bi * n * rows + blk * rows) * h * d + chunk * hc * d) * e
                dpitch = h * d * e
            if j == me and local == "triton":   # the own piece: an SM copy either way (runtime/local_copy.py)
                with torch.cuda.stream(sj):
                    copy2d(st["buf"], (dst - st["buf"].data_ptr()) // e, dpitch // e, xt, (src - xt.data_ptr()) // e,
                           spitch // e, width // e, rows)
            elif j in by_sm:                    # stored over NVLink by SMs, beside the copy engine's pieces
                peer = _peer_view(st, j, x.dtype)
                with torch.cuda.stream(sj):
                    copy2d(peer, (dst - st["hdl"].buffer_ptrs[j]) // e, dpitch // e, xt, (src - xt.data_ptr()) // e,
                           spitch // e, width // e, rows)
            else:
                _memcpy2d(dst, dpitch, src, spitch, width, rows, sj)
        if flag:
            if j != me:      # rank j's flag [chunk, me]: my pieces have landed there
                _check_cu(_cuda()["write32"](ctypes.c_void_p(sj.cuda_stream), fl["ptrs"][j] + (fchunk * n + me) * 4,
                                             1, 0), "cuStreamWriteValue32")
            events.append(sj.record_event())
        else:
            side.wait_stream(sj)
    last = kind != "op" or chunk == chunks - 1   # op: the last part completes all of them
    if flag:
        base = fl["ptrs"][me] + fchunk * n * 4
        if _signal_mode() == "spin":    # the wait's kernel reads flags[fchunk * n: (fchunk + 1) * n]
            _PENDING[(group_name, kind, slot, chunk)] = (events, xt, [(fl["flags"], fchunk * n, (fchunk + 1) * n,
                                                                       n, me)] if last else [])
        else:
            _PENDING[(group_name, kind, slot, chunk)] = (events, xt, [base + p * 4 for p in range(n) if p != me]
                                                         if last else [])
        return _token(x, kind)
    if not last:
        _PENDING[(group_name, kind, slot, chunk)] = ([], xt, [])
        return _token(x, kind)
    if kind == "op":        # the earlier parts' copies too
        for sj in streams:
            side.wait_stream(sj)
    with torch.cuda.stream(side):
        st["hdl"].barrier(channel=0, timeout_ms=_timeout_ms())
    _PENDING[(group_name, kind, slot, chunk)] = ([side.record_event()], xt, [])
    return _token(x, kind)


def _token(x: Tensor, kind: str) -> Tensor:
    """What a start returns: an empty tensor; for an in-place kind (0, *x.shape), so the wait knows the shape without
    taking x (x is then a view of the buffer the wait returns a view of, and a custom op's output may not alias its
    inputs; the start keeps x alive until the wait, as for every kind)."""
    return x.new_empty((0, *x.shape)) if kind in IN_PLACE else x.new_empty(0)


_PARTS: dict = {}     # (group, slot) -> the op parts started so far (fallback: sent together with the last)


def _peer_view(st: dict, j: int, dtype: torch.dtype) -> Tensor:
    """Rank j's whole symmetric-memory allocation behind this receive buffer, as a flat tensor mapped here."""
    views = st.setdefault("peer", {})
    if j not in views:
        hdl = st["hdl"]
        views[j] = hdl.get_buffer(j, (hdl.buffer_size // torch.empty(0, dtype=dtype).element_size(),), dtype, 0)
    return views[j]


def _fallback(buf: Tensor, xt: Tensor, kind: str, chunk: int, chunks: int, n: int, me: int, hc: int, pg, key):
    """The same transfer with dist.all_to_all_single (gloo, or GPUs the copy engines cannot use): fills the same
    receive buffer in the same layout."""
    if kind == "op":         # the parts are sent together with the last one, in rotated block order
        parts = _PARTS[key] = [] if chunk == 0 else _PARTS.get(key, [])
        parts.append(xt)
        if len(parts) != chunk + 1:
            raise RuntimeError(f"xdit.a2a_start('op', slot {key[1]}): part {chunk} of {chunks} without the parts "
                               "before it")
        if chunk < chunks - 1:
            return
        del _PARTS[key]
        xt = torch.cat(parts, 1).unflatten(1, (n, -1))               # (B, N, S', h, D), block b: rank me + 1 + b
        xt = xt[:, [(j - me - 1) % n for j in range(n)]].flatten(1, 2)  # back to rank order
        chunks, chunk = 1, 0
    if kind in ("o", "op"):  # pieces = sequence slices of this chunk: (N, B, S', hc, D)
        send = xt.unflatten(1, (n, -1)).transpose(0, 1).contiguous()
    else:                    # pieces = head chunk c of every rank's head group: (N, B, S, hc, D)
        send = xt.unflatten(2, (n, chunks, -1))[:, :, :, chunk].permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=pg)   # recv[P] = rank P's piece for this rank
    if kind in ("o", "op"):  # (B, S', H, D) with H = (P, C, hc)
        buf.unflatten(2, (n, chunks, hc))[:, :, :, chunk].copy_(recv.permute(1, 2, 0, 3, 4))
    else:                    # (B, L, h, D) with L = (P, S), h = (C, hc); qr: block b from rank me + 1 + b
        if kind == "qr":
            recv = recv[[(me + 1 + b) % n for b in range(n)]]
        buf.unflatten(2, (chunks, hc))[:, :, chunk].copy_(recv.transpose(0, 1).flatten(1, 2))


def _own_piece(buf: Tensor, xt: Tensor, kind: str, chunk: int, chunks: int, n: int, me: int, hc: int):
    """Under torch's fake process group (no peers, profile_step.py --fake-world): only the rank's own piece, put
    where _fallback and the copy engines put it, so the step's SM work is a real rank's (the peers' pieces are the
    copy engines' work, free here)."""
    if kind in ("o", "op"):  # my tokens' block (op: the last block of the last part), at my head group's heads
        if kind == "op":
            if chunk < chunks - 1:
                return
            own = xt.unflatten(1, (n // chunks, -1))[:, -1]
            chunks, chunk = 1, 0
        else:
            own = xt.unflatten(1, (n, -1))[:, me]
        buf.unflatten(2, (n, chunks, hc))[:, :, me, chunk].copy_(own)
    else:                    # my head group's chunk of my tokens, at my token block (qr: the last block)
        blk = n - 1 if kind == "qr" else me
        buf.unflatten(2, (chunks, hc))[:, :, chunk].unflatten(1, (n, -1))[:, blk].copy_(
            xt.unflatten(2, (n, chunks, -1))[:, :, me, chunk])


@a2a_start.register_fake
def _(x: Tensor, group_name: str, kind: str, slot: int, chunk: int = 0, chunks: int = 1,
      after: Tensor | None = None, exposed: bool = False) -> Tensor:
    return _token(x, kind)


@torch.library.custom_op("xdit::a2a_wait", mutates_args=())
def a2a_wait(tokens: list[Tensor], xs: list[Tensor], group_name: str, kind: str, slot: int, chunk: int = 0,
             chunks: int = 1) -> Tensor:
    """The result of the a2a_starts with the same (group, kind, slot), as a view of their receive buffer:
    q/k/v: head chunk `chunk` (B, h/C, L, D); o: every chunk (tokens and xs: one per chunk), (B, H, S, D).
    xs are the tensors the starts read (kept alive until here); empty for an in-place kind (the token has the shape)."""
    n = dist.distributed_c10d._resolve_process_group(group_name).size()
    x = xs[0] if xs else tokens[0]
    _, mem_shape = out_shape(kind, _sent_shape(tokens, xs), n, chunks)
    addrs = []
    for c in (range(chunks) if kind in ("o", "op") else (chunk,)):
        pending = _PENDING.pop((group_name, kind, slot, c), None)
        if pending is not None:
            for ev in pending[0]:   # my outgoing copies (they read xs) / the barrier
                torch.cuda.current_stream(x.device).wait_event(ev)
            addrs += pending[2]
    if addrs and isinstance(addrs[0], tuple):      # XDIT_CE_SIGNAL=spin: a kernel on the compute stream
        from .spin_wait import spin_wait
        for flags, lo, hi, n_, me in addrs:
            spin_wait(flags, lo, hi, n_, me, _timeout_ms())
    elif addrs:                     # every peer's pieces have landed here
        _wait_flags(addrs, torch.cuda.current_stream(x.device))
    st = _BUFS.get((group_name, kind, slot, tuple(mem_shape), x.dtype, x.device))
    if st is None:
        raise RuntimeError(f"xdit.a2a_wait({kind!r}, slot {slot}) without its a2a_start")
    buf = st["buf"]
    if kind in IN_PLACE:
        return _received(buf, kind, n, dist.distributed_c10d._resolve_process_group(group_name).rank())
    if kind not in ("o", "op") and chunks > 1:
        hc = mem_shape[2] // chunks
        buf = buf[:, :, chunk * hc:(chunk + 1) * hc]
    return buf.transpose(1, 2)


@a2a_wait.register_fake
def _(tokens: list[Tensor], xs: list[Tensor], group_name: str, kind: str, slot: int, chunk: int = 0,
      chunks: int = 1) -> Tensor:
    n = dist.distributed_c10d._resolve_process_group(group_name).size() if dist.is_initialized() else 1
    _, mem_shape = out_shape(kind, _sent_shape(tokens, xs), n, chunks)
    buf = tokens[0].new_empty(mem_shape)
    if kind in IN_PLACE:     # any rank's view has this shape and these strides
        return _received(buf, kind, n, 0)
    if kind not in ("o", "op") and chunks > 1:
        hc = mem_shape[2] // chunks
        buf = buf[:, :, chunk * hc:(chunk + 1) * hc]
    return buf.transpose(1, 2)


def _received(buf: Tensor, kind: str, n: int, me: int) -> Tensor:
    """An in-place kind's result, a view of its (B, L, H, D) buffer: oi this rank's rows (B, H, S', D), qi / ki / vi
    this rank's heads (B, h, L, D)."""
    if kind == "oi":
        s = buf.shape[1] // n
        return buf[:, me * s:(me + 1) * s].transpose(1, 2)
    h = buf.shape[2] // n
    return buf[:, :, me * h:(me + 1) * h].transpose(1, 2)


def _sent_shape(tokens: list[Tensor], xs: list[Tensor]):
    if xs:
        return xs[0].shape
    if tokens and tokens[0].dim() == 5:
        return tokens[0].shape[1:]
    raise ValueError("xdit.a2a_wait: xs is empty and the token is not an in-place kind's")
