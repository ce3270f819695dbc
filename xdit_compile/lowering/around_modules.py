"""Lower a graph with Inductor around its ``call_module`` nodes, which stay eager.

PipeFusion's stage graphs call ``PFAttention`` modules: stateful (a K/V buffer written in place) and with
collectives inside, so Inductor must not trace them. ``lower_around`` cuts a graph at every ``call_module``
node (``split_module``, each such node alone in its piece) and compiles each other piece on its first call,
with that call's arguments as example inputs (a PipeFusion program has fixed shapes, so one compile serves
every later call).

    before:  x -> [linear, norm, q/k/v] -> PFAttention -> [proj, mlp, q/k/v] -> PFAttention -> [proj] -> out
    after:   x -> Lazy(piece 0)         -> PFAttention -> Lazy(piece 2)      -> PFAttention -> Lazy(piece 4)

A piece without compute (it only passes values on) or with an argument that is not a tensor runs eagerly.
``LoweringStats`` counts what was compiled and how long it took, for ``explain``.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module


@dataclass
class LoweringStats:
    lowering: str = "inductor"
    pieces: int = 0          # pieces that will be compiled on their first call
    compiled: int = 0        # of those, compiled so far
    eager_modules: int = 0   # call_module nodes kept eager (PFAttention)
    eager_pieces: int = 0    # pieces run eagerly: no compute, or a non-tensor argument
    seconds: float = 0.0     # total compile time so far


class _Lazy(torch.nn.Module):
    """A graph piece lowered on its first call, with that call's arguments as example inputs."""

    def __init__(self, gm: fx.GraphModule, lowering: str, stats: LoweringStats):
        super().__init__()
        self.gm, self.lowering, self.stats = gm, lowering, stats
        self.fn = None

    def forward(self, *args):
        if self.fn is None:
            if not all(isinstance(a, torch.Tensor) for a in args):
                self.fn = self.gm.forward
                self.stats.pieces -= 1
                self.stats.eager_pieces += 1
            else:
                t0 = time.perf_counter()
                self.fn = _compile(self.gm, args, self.lowering)
                self.stats.seconds += time.perf_counter() - t0
                self.stats.compiled += 1
        return self.fn(*args)


def _compile(gm: fx.GraphModule, args, lowering: str):
    """``lower`` on fake copies of ``args`` in a tracing context with a shape env, as dynamo calls a backend:
    without a shape env Inductor bypasses its FX graph cache, which makes the pieces of identical blocks
    (and of the same stage in every patch program) cheap after the first."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from . import lower
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a, static_shapes=True) for a in args]
    with tracing(TracingContext(mode)):
        return lower(gm, fakes, lowering)


def _has_compute(gm: fx.GraphModule) -> bool:
    return any(n.op in ("call_function", "call_method") and n.target is not operator.getitem
               for n in gm.graph.nodes)


def lower_around(gm: fx.GraphModule, lowering: str, stats: LoweringStats) -> fx.GraphModule:
    """``gm`` with its non-``call_module`` code in lazily lowered pieces; ``gm`` itself is left as it was."""
    part, k = {}, 0
    for n in gm.graph.nodes:
        if n.op == "call_module":
            part[n] = k + 1
            k += 2
        elif n.op not in ("placeholder", "output"):
            part[n] = k
    if not part:
        return gm
    top = split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    for n in top.graph.nodes:
        if n.op != "call_module":
            continue
        piece = getattr(top, n.target)
        if any(u.op == "call_module" for u in piece.graph.nodes):
            stats.eager_modules += 1
        elif not _has_compute(piece):
            stats.eager_pieces += 1
        else:
            setattr(top, n.target, _Lazy(piece, lowering, stats))
            stats.pieces += 1
    return top
