"""xdit::fused_linear: one linear over weights concatenated once, at compile time (compile.fuse_modulation).

shard_modulation turns a group of per-sample modulation linears (all reading the same silu(temb)) into one
linear per member over this rank's rows. With fuse_modulation the rows of all members are concatenated ONCE
into one weight held here, and the graph calls ``torch.ops.xdit.fused_linear(x, key)``: one GEMV (FLUX: 1
instead of 77). The weight lives in this module, not in the graph, so neither aot_autograd nor Inductor sees a
new parameter or constant; CUDA graphs capture the GEMV on the held tensor.

The concatenation is a copy (1/N of the group's weights per rank) and does not follow weights changed in
place after the compile. Concatenations are shared by key: the same weights, rows and rank give the same copy,
so a recompile (another resolution) adds no memory; a copy goes when the tensors it was made from are gone.
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

_HELD: dict[str, tuple[Tensor, Tensor | None]] = {}
_SOURCES: dict[str, list] = {}     # key -> weak references to the tensors it was made from


def _drop_dead() -> None:
    for k in [k for k, refs in _SOURCES.items() if any(r() is None for r in refs)]:
        _HELD.pop(k, None)
        del _SOURCES[k]                    # made from tensors that are gone (a model that was dropped)
        _PENDING.pop(k, None)
        _SHAPES.pop(k, None)


def _held(key: str, op: str) -> tuple[Tensor, Tensor | None]:
    if key not in _HELD:
        raise RuntimeError(f"xdit.{op}: the weights this graph was compiled with are gone (the model was dropped); "
                           "compile the model again")
    return _HELD[key]


def hold(weights: list[Tensor], biases: list[Tensor | None], rows: list[tuple[int, int]]) -> str:
    """Concatenate rows [a, b) of every weight (and bias; zeros where a member has none); returns the key."""
    key = "|".join(f"{w.data_ptr():x}:{a}:{b}:{'' if bi is None else f'{bi.data_ptr():x}'}"
                   for w, bi, (a, b) in zip(weights, biases, rows))
    _drop_dead()
    srcs = [t for t in (*weights, *biases) if t is not None]
    if key not in _HELD or any(r() is not t for r, t in zip(_SOURCES[key], srcs)):   # new tensors, same addresses
        with torch.no_grad():
            w = torch.cat([w[a:b] for w, (a, b) in zip(weights, rows)])
            bias = None
            if any(bi is not None for bi in biases):
                bias = torch.cat([w_[a:b].new_zeros(b - a) if bi is None else bi[a:b]
                                  for w_, bi, (a, b) in zip(weights, biases, rows)])
        _HELD[key] = (w, bias)
        _SOURCES[key] = [weakref.ref(t) for t in srcs]
    return key


@torch.library.custom_op("xdit::fused_linear", mutates_args=())
def fused_linear(x: Tensor, key: str) -> Tensor:
    w, b = _held(key, "fused_linear")
    return F.linear(x, w, b)


@fused_linear.register_fake
def _(x: Tensor, key: str) -> Tensor:
    w, _ = _HELD[key]
    return x.new_empty((*x.shape[:-1], w.shape[0]))


_PENDING: dict[str, tuple[list[Tensor], list[Tensor] | None]] = {}   # joined by join_pending, after lowering
_SHAPES: dict[str, tuple[int, ...]] = {}                               # key -> the joined weight's shape
_COUNT = itertools.count()   # keys: an address would not do, the join frees the old storage for reuse


def _adjacent(ts: list[Tensor]) -> Tensor | None:
    """The tensor whose row blocks are ts, where they already lie back to back in one storage (a later compile of
    the same model, after join_pending), as a view; else None."""
    t0 = ts[0]
    st, off = t0.untyped_storage(), t0.storage_offset()
    rows = sum(t.shape[0] for t in ts)
    if all(t.is_contiguous() and t.dtype == t0.dtype and t.shape[1:] == t0.shape[1:]
           and t.untyped_storage().data_ptr() == st.data_ptr()
           and t.storage_offset() == off + sum(u.numel() for u in ts[:i]) for i, t in enumerate(ts)):
        return t0.new_empty(0).set_(st, off, (rows, *t0.shape[1:]))
    return None


def hold_siblings(weights: list[Tensor], biases: list[Tensor] | None) -> str:
    """compile.fuse_linears: the weights (and biases) of linears that read the same input, joined along the output
    features; returns the key ``xdit.sibling_linear`` takes. Where they are not yet one tensor, the join waits for
    ``join_pending`` (the backend calls it once the graph is lowered)."""
    _drop_dead()
    key = f"sib|{next(_COUNT)}|{sum(w.shape[0] for w in weights)}x{weights[0].shape[1]}"
    w = _adjacent(weights)
    b = None if biases is None else _adjacent(biases)
    if w is not None and (biases is None or b is not None):
        _HELD[key] = (w, b)
    else:
        _PENDING[key] = (weights, biases)
    _SOURCES[key] = [weakref.ref(t) for t in (*weights, *(biases or ()))]
    _SHAPES[key] = (sum(t.shape[0] for t in weights), *weights[0].shape[1:])
    return key


def join_pending() -> int:
    """Join each pending group into one new tensor and make its sources views of it (``t.data = joined[a:b]``):
    the old storage goes, so memory grows by one group at a time and not at all after, and weights loaded in
    place later land in the joined tensor. Only after lowering: Inductor makes its fake inputs from the
    parameters as dynamo traced them, storage offset included. Returns how many groups were joined."""
    done = 0
    with torch.no_grad():
        for key, (ws, bs) in list(_PENDING.items()):
            joined = []
            for ts in (ws, bs):
                if ts is None:
                    joined.append(None)
                    continue
                j = _adjacent(ts)     # a group of another program of the same compile (pipefusion) joined them
                if j is None:
                    j = torch.cat(ts)
                    a = 0
                    for t in ts:
                        t.data = j[a:a + t.shape[0]]
                        a += t.shape[0]
                joined.append(j)
            _HELD[key] = (joined[0], joined[1])
            del _PENDING[key]
            done += 1
    return done


@torch.library.custom_op("xdit::sibling_linear", mutates_args=())
def sibling_linear(x: Tensor, key: str) -> Tensor:
    """``cat([linear(x, w_i, b_i) for i], -1)`` of linears that read the same x, as one GEMM over their joined
    weights (passes/fuse_linears.py)."""
    if key in _PENDING:
        join_pending()
    w, b = _held(key, "sibling_linear")
    return F.linear(x, w, b)


@sibling_linear.register_fake
def _(x: Tensor, key: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], _SHAPES[key][0]))


def linear_gelu_tanh(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``gelu(linear(x, w, b), approximate="tanh")``; on CUDA in bf16 / fp16 one cuBLASLt GEMM with bias + GELU
    in its epilogue (``torch._addmm_activation``, which Inductor keeps as one extern call; passes/fuse_gelu.py)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype == b.dtype and x.dim() >= 2:
        y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
        return y.view(*x.shape[:-1], w.shape[0])
    return F.gelu(F.linear(x, w, b), approximate="tanh")
