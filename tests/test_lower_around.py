"""lower_around: Inductor around call_module nodes (PipeFusion's stateful PFAttention), on a small traced graph."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from xdit_compile.lowering.around_modules import LoweringStats, lower_around


class Acc(torch.nn.Module):
    """Stateful like PFAttention: a buffer written in place on every call, read back."""

    def __init__(self):
        super().__init__()
        self.buf, self.calls = None, 0

    def forward(self, x):
        self.calls += 1
        if self.buf is None:
            self.buf = torch.zeros_like(x)
        self.buf.add_(x)
        return self.buf * 1.0


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.acc1, self.acc2 = torch.nn.Linear(8, 8), Acc(), Acc()

    def forward(self, x, w):
        a = self.acc1(self.lin(x).relu())
        b = self.acc2(a)             # no code between the two modules: no piece
        return (b.sin() + w) * 2     # one output, not a tuple


class _Leaf(fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, Acc)    # Linear traced through: only the stateful modules are call_module


def _traced(net):
    return fx.GraphModule(net, _Leaf().trace(net))


def test_pieces_compiled_modules_eager_and_state_kept():
    torch.manual_seed(0)
    net = Net()
    ref_net = copy.deepcopy(net)
    gm, ref = _traced(net), _traced(ref_net)
    code = gm.code
    stats = LoweringStats()
    top = lower_around(gm, "inductor", stats)
    assert gm.code == code                            # the input graph is left as it was
    assert (stats.pieces, stats.eager_modules, stats.compiled) == (2, 2, 0)
    x, w = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        for _ in range(3):                            # the buffers grow: each call differs from the last
            out, want = top(x, w), ref(x, w)
            assert isinstance(out, torch.Tensor)
            torch.testing.assert_close(out, want)
    assert stats.compiled == 2 and stats.seconds > 0  # once each, on the first call
    assert net.acc1.calls == net.acc2.calls == 3      # the stateful modules ran eagerly every call


def test_no_module_no_split():
    gm = fx.symbolic_trace(lambda x: x.relu())
    stats = LoweringStats()
    top = lower_around(gm, "inductor", stats)
    # one piece, compiled on first call; nothing eager
    assert (stats.pieces, stats.eager_modules, stats.eager_pieces) == (1, 0, 0)
    assert top is not gm
