"""schedule_transfers_pass: order the graph so copy-engine transfers run beside independent compute.

Runs after decompose_ulysses with compile.all_to_all = "copy_engine" (its `xdit.a2a_start` / `a2a_wait` pairs,
runtime/ce_a2a.py). A transfer started early and waited for late costs nothing while matmuls run in between
(the copy engines need no SMs). Two rewrites:

1. Split a linear over a concatenation when one part waits on a transfer and another does not:
       linear(cat([a, m], -1), W, b)  ->  linear(m, W[:, A:], b) + linear(a, W[:, :A])     (A = a's width)
   The first linear needs no transfer; it is placed right after the start of the transfer the other part
   waits on, so it can run while that transfer moves. (FLUX's and HunyuanVideo's single blocks: proj_out over
   [attention, mlp]; the mlp half, 4/5 of its FLOPs, runs during the attention output's return trip.) One more
   bf16 rounding of the partial sum: a difference of the order of bf16's epsilon.
   (The rewrite is split_cat_linears.split_linear_over_cat; that pass, later, splits such linears in every plan,
   in place.)
2. List-schedule the nodes between impure nodes (placeholders, the output, in-place ops, side effects stay
   where they are) in this priority:
     a. a start whose inputs are computed;
     b. the cone of one of the next starts (the unscheduled nodes it needs, none of them a wait), the start
        with the smallest cone first: v (one projection) goes before k and q (projection, norm, rotary), so
        v moves while k and q are computed;
     c. any other computable node, lowest original position first, but only one that came before the first
        user of a pending wait (FLUX's single block: proj_mlp fills the q/k/v transfers, the split-off mlp
        half of proj_out the output's);
     d. the earliest pending wait.
   Within a class the original order decides, so the result is deterministic and the same on every rank.
3. Chain the starts (each takes the previous one's token), so Inductor runs them in that order on every rank:
   its code differs per rank, and starts in different orders pair the wrong buffers or deadlock (_chain_starts).

Inductor keeps this order: the lowering turns off its peak-memory reordering and its post-grad reorder_for_locality
(which would move every start right before its wait, its only user) when the graph holds a2a_start.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .split_cat_linears import cat_linear_parts, split_linear_over_cat

START = torch.ops.xdit.a2a_start.default
WAIT = torch.ops.xdit.a2a_wait.default
LOOKAHEAD = 8
"""How many of the next starts (original order) compete in rule b."""
MAX_CONE = 4000


def schedule_transfers_pass(gm: fx.GraphModule, ctx) -> bool:
    g = gm.graph
    if not any(n.target is START for n in g.nodes):
        return False
    split = _split_cat_linears(gm)
    if hasattr(ctx, "transfer_report"):
        ctx.transfer_report["split_linears"] = split
    _copy_outputs(g)
    moved = _schedule(g)
    if hasattr(ctx, "transfer_report"):
        ctx.transfer_report["moved_nodes"] = moved
    _chain_starts(g)
    return True


def _chain_starts(g: fx.Graph) -> None:
    """Each start takes the previous start's token (`after`), so the starts run in this order on every rank.

    Starts have no data dependency on each other, and Inductor's code for each rank differs in its constants
    (each rank's slice of the sequence), so its fusion may place them differently per rank (the Wan 480p
    deadlock on 4 x H100 showed different code per rank; which order each rank ran was not seen). A start could
    allocate its receive buffer collectively (a rendezvous: buffers made in different orders would pair the wrong
    buffers) and it queues a barrier kernel on one side stream (barriers queued in different orders would wait
    for each other forever)."""
    prev = None
    for n in g.nodes:
        if n.target is START:
            if prev is not None:
                n.kwargs = {**n.kwargs, "after": prev}
            prev = n


# --- 1. linear(cat) split -------------------------------------------------------------------------------


def _waits_above(n: fx.Node, limit: int = 64) -> list[fx.Node]:
    """a2a_wait nodes among n's nearest ancestors (search stops at a wait and after `limit` nodes)."""
    seen, stack, found = set(), [n], []
    while stack and len(seen) < limit:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.target is WAIT:
            found.append(x)
            continue
        stack.extend(x.all_input_nodes)
    return found


def _split_cat_linears(gm: fx.GraphModule) -> int:
    g = gm.graph
    count = 0
    for lin in list(g.nodes):
        found = cat_linear_parts(lin)
        if found is None or len(found[0]) != 2:
            continue
        parts = found[0]
        late = [bool(_waits_above(p)) for p in parts]
        if late[0] == late[1]:
            continue
        starts = [t for wt in _waits_above(parts[late.index(True)]) for t in wt.args[0] if isinstance(t, fx.Node)]
        if not starts:
            continue
        split_linear_over_cat(g, lin, early=late.index(False), anchor=max(starts, key=lambda s: _pos(g, s)))
        count += 1
    return count


def _pos(g: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(g.nodes):
        if n is node:
            return i
    return -1


_VIEWS = {"transpose", "permute", "reshape", "view", "flatten", "unflatten", "unsqueeze", "squeeze", "getitem",
          "contiguous", "narrow", "select", "split", "chunk", "expand", "movedim", "t"}


def _copy_outputs(g: fx.Graph) -> None:
    """A wait returns a view of a buffer the next transfers overwrite: a graph output that may be one (through
    view-like ops) is cloned, so what the caller holds stays valid."""
    out = next(n for n in g.nodes if n.op == "output")

    def base_is_wait(n, depth=0):
        if not isinstance(n, fx.Node) or depth > 16:
            return False
        if n.target is WAIT:
            return True
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        return name.rstrip("_") in _VIEWS and bool(n.args) and base_is_wait(n.args[0], depth + 1)

    def fix(a):
        if isinstance(a, fx.Node) and base_is_wait(a):
            with g.inserting_before(out):
                c = g.call_function(torch.clone, (a,))
            c.meta = dict(a.meta)
            return c
        return a

    out.args = fx.node.map_arg(out.args, fix)


# --- 2. list scheduling ---------------------------------------------------------------------------------


def _impure(n: fx.Node) -> bool:
    if n.op in ("placeholder", "output"):
        return True
    if n.op == "call_function" and n.target in (START, WAIT):
        return False
    if n.op in ("call_method", "call_function"):
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True           # in-place
        if n.target in (operator.setitem, operator.iadd, operator.isub, operator.imul):
            return True
    try:
        return n.is_impure()
    except Exception:  # noqa: BLE001
        return True


def _schedule(g: fx.Graph) -> int:
    nodes = list(g.nodes)
    segments, cur = [], []
    for n in nodes:
        if _impure(n):
            if cur:
                segments.append(cur)
            segments.append([n])
            cur = []
        else:
            cur.append(n)
    if cur:
        segments.append(cur)
    order = []
    for seg in segments:
        order.extend(_schedule_segment(seg) if len(seg) > 1 else seg)
    moved = sum(a is not b for a, b in zip(order, nodes))
    prev = None
    for n in order:                  # relink in the new order
        if prev is not None and prev.next is not n:
            prev.append(n)
        prev = n
    return moved


def _schedule_segment(seg: list[fx.Node]) -> list[fx.Node]:
    idx = {n: i for i, n in enumerate(seg)}
    members = set(seg)
    deps = {n: [d for d in n.all_input_nodes if d in members] for n in seg}
    users = {n: [u for u in n.users if u in members] for n in seg}
    missing = {n: len(set(deps[n])) for n in seg}
    first_user = {n: min((idx[u] for u in users[n]), default=len(seg)) for n in seg}
    starts = [n for n in seg if n.target is START]
    if not starts:
        return seg
    done: set = set()
    ready = {n for n in seg if missing[n] == 0}
    pending_waits: set = set()
    order: list[fx.Node] = []
    cone: list[fx.Node] = []           # rule b's target: nodes still to emit, original order
    blocked: dict = {}                 # start -> a wait its cone holds (no use looking again before it is done)

    def emit(n):
        order.append(n)
        done.add(n)
        ready.discard(n)
        if n.target is START:
            pending_waits.update(u for u in users[n] if u.target is WAIT)
        if n.target is WAIT:
            pending_waits.discard(n)
        for u in set(users[n]):
            missing[u] -= 1
            if missing[u] == 0:
                ready.add(u)

    def cone_of(s):
        """Unscheduled nodes s needs (s excluded), or None when one of them is a wait or it is too large."""
        w = blocked.get(s)
        if w is not None and w not in done:
            return None
        seen, stack = set(), [d for d in deps[s] if d not in done]
        while stack:
            x = stack.pop()
            if x in seen:
                continue
            if x.target is WAIT or len(seen) > MAX_CONE:
                blocked[s] = x
                return None
            seen.add(x)
            stack.extend(d for d in deps[x] if d not in done and d not in seen)
        return sorted(seen, key=idx.__getitem__)

    while len(order) < len(seg):
        s_ready = sorted((n for n in ready if n.target is START), key=idx.__getitem__)
        if s_ready:
            emit(s_ready[0])
            continue
        cone = [n for n in cone if n not in done]
        if not cone:
            best = None
            for s in [s for s in starts if s not in done][:LOOKAHEAD]:
                c = cone_of(s)
                if c and (best is None or len(c) < len(best)):
                    best = c
            cone = best or []
        pick = next((n for n in cone if n in ready), None)
        if pick is None:
            limit = min((first_user[w] for w in pending_waits), default=len(seg))
            cands = [n for n in ready if n.target is not WAIT and (idx[n] < limit or not pending_waits)]
            if cands:
                pick = min(cands, key=idx.__getitem__)
            else:
                waits = [w for w in ready if w.target is WAIT]
                pick = min(waits or ready, key=idx.__getitem__)
        emit(pick)
    return order
