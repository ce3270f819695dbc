"""fuse_gelu_pass: a linear followed by tanh-GELU becomes one GEMM with bias + GELU in its epilogue.

    before:  y = linear(x, w, b) ; z = gelu(y, approximate="tanh")         (y has no other user)
    after:   z = linear_gelu_tanh(x, w, b)       (runtime/fused_linear.py)

On CUDA (bf16 / fp16) ``linear_gelu_tanh`` is ``torch._addmm_activation(b, x, w.t(), use_gelu=True)``: cuBLASLt
adds the bias and applies tanh-GELU while the tile is still in registers, and Inductor keeps the call whole (an
extern kernel). Without it Inductor runs the GEMM, then a Triton kernel that reads the whole output back, adds
the bias, applies GELU and writes it again. Elsewhere (CPU, float32) it is the unfused pair, so the graph means
the same on every device.

Measured on one H100 (benchmarks/results/gelu_epilogue.md, Inductor on both sides): FLUX's single-block
proj_mlp at 1024² ulysses 4 (1152 x 3072 -> 12288) 154.8 -> 120.7 us, its double-block ff 129.2 -> 108.5 us,
2048² 529.0 -> 472.2 us, Wan2.1-14B's ffn at 480p ulysses 4 1834.6 -> 1619.3 us. The epilogue rounds once, after
the GELU, instead of also before it: 1.7e-3 relative error against float32 where the pair has 2.4e-3.

Matches FLUX's (single-block act_mlp, FeedForward "gelu-approximate"), SD3's, Wan's and PixArt's MLPs: every
``F.gelu(..., approximate="tanh")`` of a biased linear with a parameter weight. Exact GELU (erf) is left alone:
cuBLASLt's epilogue is the tanh form.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..runtime import fused_linear

_GELU = {torch._C._nn.gelu, F.gelu}
_LINEAR = {torch._C._nn.linear, F.linear}


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def fuse_gelu_pass(gm: fx.GraphModule, ctx) -> bool:
    g = gm.graph
    count = 0
    for gelu in list(g.nodes):
        if gelu.op != "call_function" or gelu.target not in _GELU or _arg(gelu, 1, "approximate") != "tanh":
            continue
        lin = gelu.args[0] if gelu.args else gelu.kwargs.get("input")
        if not (isinstance(lin, fx.Node) and lin.op == "call_function" and lin.target in _LINEAR
                and len(lin.users) == 1):
            continue
        x, w, b = lin.args[0], _arg(lin, 1, "weight"), _arg(lin, 2, "bias")
        if not (isinstance(w, fx.Node) and w.op in ("get_attr", "placeholder") and isinstance(b, fx.Node)):
            continue
        with g.inserting_before(gelu):
            fused = g.call_function(fused_linear.linear_gelu_tanh, (x, w, b))
        fused.meta = dict(gelu.meta)
        gelu.replace_all_uses_with(fused)
        g.erase_node(gelu)
        g.erase_node(lin)
        count += 1
    if hasattr(ctx, "fuse_report"):
        ctx.fuse_report["gelu"] = count
    return count > 0
