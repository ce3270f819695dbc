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


def hold(weights: list[Tensor], biases: list[Tensor | None], rows: list[tuple[int, int]]) -> str:
    """Concatenate rows [a, b) of every weight (and bias; zeros where a member has none); returns the key."""
    key = "|".join(f"{w.data_ptr():x}:{a}:{b}:{'' if bi is None else f'{bi.data_ptr():x}'}"
                   for w, bi, (a, b) in zip(weights, biases, rows))
    for k in [k for k, refs in _SOURCES.items() if any(r() is None for r in refs)]:
        del _HELD[k], _SOURCES[k]          # made from tensors that are gone (a model that was dropped)
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


def linear_gelu_tanh(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``gelu(linear(x, w, b), approximate="tanh")``; on CUDA in bf16 / fp16 one cuBLASLt GEMM with bias + GELU
    in its epilogue (``torch._addmm_activation``, which Inductor keeps as one extern call; passes/fuse_gelu.py)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype == b.dtype and x.dim() >= 2:
        y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
        return y.view(*x.shape[:-1], w.shape[0])
    return F.gelu(F.linear(x, w, b), approximate="tanh")
