"""find_blocks: the repeated blocks of real diffusers DiTs, from the captured graph alone."""
import dataclasses

import pytest
import torch

from models import MODELS
from xdit_compile.passes.find_blocks import find_blocks, live_across, module_path


def _capture(model, inputs):
    gms = []

    def backend(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(**inputs)
    return gms


def test_module_path():
    assert module_path("L['self'].__dict__['_modules']['transformer_blocks'].0") == "transformer_blocks.0"
    assert module_path("L['self'].transformer_blocks[3].attn") == "transformer_blocks.3.attn"


@pytest.mark.parametrize("name,lists", [
    ("flux", {"transformer_blocks": 2, "single_transformer_blocks": 3}),
    ("pixart", {"transformer_blocks": 3}),
    ("sd3", {"transformer_blocks": 2}),
    ("wan", {"blocks": 2}),
    ("hunyuanvideo", {"transformer_blocks": 1, "single_transformer_blocks": 1}),
])
def test_blocks_and_params(name, lists):
    case = MODELS[name]
    cfg = dict(case.config)
    if name == "flux":
        cfg.update(num_layers=2, num_single_layers=3)
    elif name == "pixart":
        cfg.update(num_layers=3)
    elif name == "wan":
        cfg.update(num_layers=2)
    model = dataclasses.replace(case, config=cfg).build()
    (gm,) = _capture(model, case.inputs())
    stack = find_blocks(gm)
    assert stack is not None
    names = [b.name for b in stack.blocks]
    assert names == [f"{k}.{i}" for k, n in lists.items() for i in range(n)]   # execution order
    for b in stack.blocks:       # every parameter of the block, and nothing else, is attributed to it
        assert b.numel == sum(p.numel() for p in model.get_submodule(b.name).parameters()), b.name
    # Blocks are contiguous, in graph order, and nothing of the block stack is in prologue/epilogue.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = -1
    for b in stack.blocks:
        assert order[b.first] > last
        assert [order[n] for n in b.nodes] == sorted(order[n] for n in b.nodes)
        last = order[b.last]
    # The hidden states cross every cut; a parameter of block 0 crosses none after it.
    live = live_across(gm, stack.cut_after(0))
    assert any(n not in stack.blocks[0].params and n.op != "placeholder" for n in live)
    assert not set(stack.blocks[0].params) & set(live)


def test_no_blocks_in_sequential_layers():
    """An nn.Sequential (mixed layer classes) is not a block list."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
    (gm,) = _capture(model.eval(), {"input": torch.randn(2, 4)})
    assert find_blocks(gm) is None
