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

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

_HELD: dict[str, tuple[Tensor, Tensor | None]] = {}
_SOURCES: dict[str, list] = {}     # key -> weak references to the tensors it was made from


def _drop_dead() -> None:
    for k in [k for k, refs in _SOURCES.items() if any(r() is None for r in refs)]:
        del _HELD[k], _SOURCES[k]          # made from tensors that are gone (a model that was dropped)
        _WIDTHS.pop(k, None)


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
    if key not in _HELD:
        raise RuntimeError("xdit.fused_linear: the weights this graph was compiled with are gone (the model was "
                           "dropped); compile the model again")
    w, b = _HELD[key]
    return F.linear(x, w, b)


@fused_linear.register_fake
def _(x: Tensor, key: str) -> Tensor:
    w, _ = _HELD[key]
    return x.new_empty((*x.shape[:-1], w.shape[0]))


SPLIT_ROWS = 4096
"""xdit.sibling_linear: inputs of at least this many rows run one GEMM per member, each writing its
columns of the joined output, instead of one GEMM over the joined weight (one H200, FLUX q/k/v 3072 -> 3 x 3072:
at 4096 rows the joined GEMM took 345 us against 314 for three, at 2048 rows 173 against 180, at 256 rows 27
against 56: benchmarks/results/gemm_fusion.md)."""
_WIDTHS: dict[str, list[int]] = {}


_REBIND: dict[tuple, tuple[list[Tensor], Tensor]] = {}   # joined, not yet rebound (see rebind_joined)


def _joined(ts: list[Tensor]) -> Tensor:
    """One tensor whose row blocks are ts. Where they already lie back to back in one storage (a later compile of
    the same model) it is a view of it. Otherwise a copy; ``rebind_joined`` then makes each t a view of its block
    (``t.data = ...``), so no memory is added and weights loaded in place later land in the joined tensor."""
    t0 = ts[0]
    st, off = t0.untyped_storage(), t0.storage_offset()
    rows = sum(t.shape[0] for t in ts)
    if all(t.is_contiguous() and t.untyped_storage().data_ptr() == st.data_ptr() and t.dtype == t0.dtype
           and t.storage_offset() == off + sum(u.numel() for u in ts[:i]) for i, t in enumerate(ts)) \
            and off + rows * t0[0].numel() <= st.nbytes() // t0.element_size():
        return t0.new_empty(0).set_(st, off, (rows, *t0.shape[1:]))
    key = tuple(id(t) for t in ts)
    if key not in _REBIND:          # another program of the same compile (pipefusion) joins the same weights once
        _REBIND[key] = (ts, torch.cat(ts))
    return _REBIND[key][1]


def rebind_joined() -> int:
    """Make the joined weights' sources views of them; the backend calls it once the graph is lowered (Inductor
    made its fake inputs from the parameters as dynamo traced them, storage offset included). Returns how many."""
    n = 0
    for ts, j in _REBIND.values():
        a = 0
        for t in ts:
            t.data = j[a:a + t.shape[0]]
            a += t.shape[0]
            n += 1
    _REBIND.clear()
    return n


def hold_siblings(weights: list[Tensor], biases: list[Tensor] | None) -> str:
    """compile.fuse_linears: the weights (and biases) of linears that read the same input, joined along the output
    features (no copy kept: see _joined); returns the key ``xdit.sibling_linear`` takes."""
    with torch.no_grad():
        w = _joined(weights)
        b = None if biases is None else _joined(biases)
    key = f"sib|{w.data_ptr():x}|{w.shape[0]}|{'' if b is None else f'{b.data_ptr():x}'}"
    _drop_dead()
    _HELD[key] = (w, b)
    _SOURCES[key] = [weakref.ref(t) for t in (*weights, *(biases or ()))]
    _WIDTHS[key] = [t.shape[0] for t in weights]
    return key


@torch.library.custom_op("xdit::sibling_linear", mutates_args=())
def sibling_linear(x: Tensor, key: str) -> Tensor:
    """``cat([linear(x, w_i, b_i) for i], -1)`` of linears that read the same x (passes/fuse_linears.py)."""
    if key not in _HELD:
        raise RuntimeError("xdit.sibling_linear: the weights this graph was compiled with are gone (the model was "
                           "dropped); compile the model again")
    w, b = _HELD[key]
    k = x.shape[-1]
    if x.numel() < SPLIT_ROWS * k:
        return F.linear(x, w, b)
    y = x.new_empty((*x.shape[:-1], w.shape[0]))
    x2, y2 = x.reshape(-1, k), y.view(-1, w.shape[0])
    a = 0
    for n in _WIDTHS[key]:     # cuBLAS writes a column block of y in place (row stride = all members' width)
        if b is None:
            torch.mm(x2, w[a:a + n].t(), out=y2[:, a:a + n])
        else:
            torch.addmm(b[a:a + n], x2, w[a:a + n].t(), out=y2[:, a:a + n])
        a += n
    return y


@sibling_linear.register_fake
def _(x: Tensor, key: str) -> Tensor:
    w, _ = _HELD[key]
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def linear_gelu_tanh(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``gelu(linear(x, w, b), approximate="tanh")``; on CUDA in bf16 / fp16 one cuBLASLt GEMM with bias + GELU
    in its epilogue (``torch._addmm_activation``, which Inductor keeps as one extern call; passes/fuse_gelu.py)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype == b.dtype and x.dim() >= 2:
        y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
        return y.view(*x.shape[:-1], w.shape[0])
    return F.gelu(F.linear(x, w, b), approximate="tanh")
