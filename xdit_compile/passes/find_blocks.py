"""Find the repeated transformer blocks in a captured graph (read-only analysis, no rewrite).

Terms:
  block       one element of an ``nn.ModuleList`` of the model (``transformer_blocks.3``), found from the
              ``nn_module_stack`` dynamo records on every node; the *outermost* list element on a node's stack
              wins, so a block's sub-blocks never count as blocks of their own.
  block stack all blocks in graph (= execution) order; Flux has two lists (19 double + 38 single blocks in the
              real config), most DiTs one.
  prologue / epilogue   the nodes before the first block / after the last one (embeddings, final norm,
              unpatchify). Nodes between two blocks that belong to neither (a ``torch.cat`` between Flux's
              double and single stacks) are *glue*, kept with the block after them.
  cut         a position between two nodes; ``live_across(gm, cut)`` is the set of values made before the cut
              and read after it: what a stage must hand to the next one, or what a cache must remember.

Used by PipeFusion (stages are contiguous runs of blocks) and by the cache passes (the first block's output
and the end of the stack). A graph whose block nodes interleave (a block's nodes not contiguous after
ignoring glue) gives ``None``: the callers then refuse with a message instead of guessing.

    prologue | block 0 | block 1 | glue | block 2 | ... | block n-1 | epilogue
             ^ cut(0)  ^ cut(1)         ^ cut(2)                   ^ cut(n) == end of stack
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

__all__ = ["Block", "BlockStack", "find_blocks", "live_across", "module_path"]

_TOKEN = re.compile(r"\[\s*'([^']+)'\s*\]|\[(\d+)\]|\.(\w+)")
_SKIP = {"__dict__", "_modules", "_parameters", "_buffers"}


def module_path(stack_entry: str) -> str:
    """``L['self'].__dict__['_modules']['transformer_blocks'].0`` -> ``transformer_blocks.0``."""
    head = stack_entry.split("[", 1)[0].split(".", 1)[0]
    rest = stack_entry[len(head):]
    parts = [a or b or c for a, b, c in _TOKEN.findall(rest)]
    parts = [p for p in parts if p not in _SKIP]
    if parts and parts[0] == "self":
        parts = parts[1:]
    return ".".join(parts)


def _block_of(node: fx.Node) -> tuple[str, type] | None:
    """(block path, class) if the node runs inside element ``<list>.<i>`` of a top-level list of the model.

    Only top-level lists count (``transformer_blocks.3``, not ``context_embedder.token_refiner.refiner_blocks.0``
    nor ``ff.net.0``): the main stack of every diffusers DiT is a top-level ``nn.ModuleList``."""
    stack = node.meta.get("nn_module_stack") or {}
    for entry, cls in stack.values():
        parts = module_path(entry).split(".")
        if len(parts) == 2 and parts[1].isdigit():
            return ".".join(parts), cls
    return None


@dataclass
class Block:
    name: str                 # "transformer_blocks.3"
    cls: str                  # "FluxTransformerBlock"
    nodes: list[fx.Node] = field(default_factory=list)    # compute nodes, graph order (glue before it included)
    params: list[fx.Node] = field(default_factory=list)   # parameter/buffer placeholders only it reads

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def numel(self) -> int:
        return sum(_numel(p) for p in self.params)


@dataclass
class BlockStack:
    blocks: list[Block]
    prologue: list[fx.Node]   # compute nodes before the first block
    epilogue: list[fx.Node]   # compute nodes after the last block

    def __len__(self) -> int:
        return len(self.blocks)

    def cut_after(self, i: int) -> fx.Node:
        """The last node of block ``i``: a cut right after it ends blocks 0..i."""
        return self.blocks[i].last

    def describe(self) -> str:
        lists: dict[str, int] = {}
        for b in self.blocks:
            lists[b.name.rsplit(".", 1)[0]] = lists.get(b.name.rsplit(".", 1)[0], 0) + 1
        return " + ".join(f"{n} x {k}" for k, n in lists.items())


def _numel(node: fx.Node) -> int:
    v = node.meta.get("example_value", node.meta.get("val"))
    return v.numel() if isinstance(v, torch.Tensor) else 0


def find_blocks(gm: fx.GraphModule) -> BlockStack | None:
    """The graph's block stack, or ``None`` when it has no blocks or their nodes interleave."""
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    owner = {n: _block_of(n) for n in compute}
    # A list of blocks repeats one model class; an nn.Sequential of layers (Linear, GELU, ...) does not.
    classes: dict[str, set] = {}
    for b in owner.values():
        if b is not None:
            classes.setdefault(b[0].split(".")[0], set()).add(b[1])
    ok = {k for k, v in classes.items()
          if len(v) == 1 and not next(iter(v)).__module__.startswith("torch.nn")}
    owner = {n: (b[0], b[1].__name__) if b is not None and b[0].split(".")[0] in ok else None
             for n, b in owner.items()}
    blocks: list[Block] = []
    seen: set[str] = set()
    pending: list[fx.Node] = []   # glue since the last block node
    prologue: list[fx.Node] = []
    for n in compute:
        b = owner[n]
        if b is None:
            pending.append(n)
            continue
        if not blocks or blocks[-1].name != b[0]:
            if b[0] in seen:
                return None       # a block resumed after another one started: interleaved
            seen.add(b[0])
            if not blocks:
                prologue, pending = pending, []
            blocks.append(Block(b[0], b[1]))
        blocks[-1].nodes.extend(pending)
        pending = []
        blocks[-1].nodes.append(n)
    if not blocks:
        return None
    # Parameters: a placeholder read only by one block's nodes belongs to that block.
    where = {n: i for i, b in enumerate(blocks) for n in b.nodes}
    for p in gm.graph.nodes:
        if p.op != "placeholder" or not p.users:
            continue
        homes = {where.get(u) for u in p.users}
        if len(homes) == 1 and None not in homes and _is_param(p):
            blocks[homes.pop()].params.append(p)
    return BlockStack(blocks, prologue, pending)


def _is_param(p: fx.Node) -> bool:
    src = p.meta.get("grapharg")
    if src is not None and hasattr(src, "source"):
        name = getattr(src.source, "name", None)
        name = name() if callable(name) else (name or str(src.source))   # a method or a property by version
    else:
        name = p.target
    return "_parameters" in str(name) or "_buffers" in str(name) or "parameters_" in p.name


def live_across(gm: fx.GraphModule, last: fx.Node) -> list[fx.Node]:
    """Values defined at or before ``last`` (placeholders included) and read by a node after it,
    in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cut = order[last]
    return [n for n in gm.graph.nodes
            if order[n] <= cut and any(order[u] > cut for u in n.users)]
