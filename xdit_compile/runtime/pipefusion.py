"""PipeFusion runtime: stage-to-stage P2P, stale-KV attention, and the per-call stage schedule.

Legend: ``_BHSD`` = (batch, heads, sequence, head dim). ``stage`` = a rank's index on the pipefusion axis.

- ``P2P``: isend/irecv of lists of tensors between neighbouring stages. Shapes travel once per message key
  (a small int64 header), then only payloads; sends are non-blocking and waited before the next collective,
  receives block. Data flows one way (stage s -> s + 1) and every rank posts its sends and receives in the
  same patch order, so there is no cycle to deadlock on for any number of stages and patches; a message is
  one tensor per value (no size limit of our own: NCCL chunks large P2P messages itself).
- ``KVState`` / ``PFAttention``: one attention layer's full-sequence K/V buffer (allocated on first use,
  then written in place). A full call writes all of it; a patch call writes its patch's fresh K/V at the
  patch's positions and attends over the whole buffer (the other patches' K/V are stale: from the previous
  step, or from earlier patches of this step). With Ulysses the buffer holds this rank's heads of the whole
  sequence, after the all-to-all. With ring (xDiT's hybrid): the ranks of a ring group are in the same stage
  on the same patch; each holds the buffer of its Ulysses group's token shard only, and the patch's queries
  attend over every ring rank's buffer as it passes around the ring (``attention._ring``, LSE merge).
- ``PipeFusionRunner``: what the dynamo backend returns. Calls ``< warmup_steps`` since ``reset()`` run the
  full sequence through the stages in order (exact, fills the buffers); later calls run ``num_patches``
  patches through the stages, stage s on patch m while stage s + 1 is on patch m - 1. The last stage runs
  the epilogue and broadcasts the output to the other stages. While ``api.pipefusion_denoise`` runs a whole
  loop, the later calls go to its ``DisplacedLoop`` instead (runtime/pipefusion_displaced.py). With
  ``compile.lowering = "inductor"``, ``PipeFusionRunner.lower`` gives each partition this rank runs a stand-in
  from ``lowering/around_modules.py`` (Inductor pieces around the eager PFAttention calls), which
  ``Program.run_part`` calls instead of the eager submodule.
"""
from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.fx as fx

from .attention import _local_attention, _ring, _ulysses_in, _ulysses_out

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.int8, torch.complex64]
_HDR = 10   # per tensor: dtype code, ndim, up to 8 sizes


def _resolve(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


class P2P:
    def __init__(self, group: str, device):
        self.pg = _resolve(group)
        self.ranks = dist.get_process_group_ranks(self.pg)
        self.device = device
        self.shapes: dict = {}       # key -> [(shape, dtype)] learned from the header
        self.announced: set = set()
        self.pending: list = []
        self.bytes_sent = 0

    def send(self, key, tensors: list[torch.Tensor], stage: int) -> None:
        dst = self.ranks[stage]
        if key not in self.announced:
            hdr = torch.zeros(1 + _HDR * len(tensors), dtype=torch.int64)
            hdr[0] = len(tensors)
            for i, t in enumerate(tensors):
                if not isinstance(t, torch.Tensor) or t.dim() > 8:
                    raise NotImplementedError(f"pipefusion: a value crossing a stage boundary is not a tensor "
                                              f"of <= 8 dims ({type(t).__name__})")
                row = [_DTYPES.index(t.dtype), t.dim(), *t.shape]
                hdr[1 + _HDR * i: 1 + _HDR * i + len(row)] = torch.tensor(row)
            n = torch.tensor([hdr.numel()], dtype=torch.int64)
            dist.send(n.to(self.device), dst, group=self.pg)
            dist.send(hdr.to(self.device), dst, group=self.pg)
            self.announced.add(key)
        for t in tensors:
            t = t.contiguous()
            self.pending.append((dist.isend(t, dst, group=self.pg), t))
            self.bytes_sent += t.numel() * t.element_size()

    def recv(self, key, stage: int) -> list[torch.Tensor]:
        src = self.ranks[stage]
        if key not in self.shapes:
            n = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.recv(n, src, group=self.pg)
            hdr = torch.zeros(int(n.item()), dtype=torch.int64, device=self.device)
            dist.recv(hdr, src, group=self.pg)
            hdr = hdr.cpu().tolist()
            meta = []
            for i in range(hdr[0]):
                row = hdr[1 + _HDR * i: 1 + _HDR * (i + 1)]
                meta.append((tuple(row[2: 2 + row[1]]), _DTYPES[row[0]]))
            self.shapes[key] = meta
        bufs = [torch.empty(s, dtype=d, device=self.device) for s, d in self.shapes[key]]
        works = [dist.irecv(b, src, group=self.pg) for b in bufs]
        for w in works:
            w.wait()
        return bufs

    def wait_sends(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []

    def broadcast(self, tensors: list[torch.Tensor], stage: int) -> None:
        for t in tensors:
            dist.broadcast(t, self.ranks[stage], group=self.pg)


class KVState:
    """One attention layer's K/V for the whole sequence (this rank's heads; with ring, this ring rank's token
    shard); allocated once."""

    def __init__(self):
        self.k = self.v = None

    def write(self, k_BHSD, v_BHSD, index) -> None:
        if index is None:
            if self.k is None or self.k.shape != k_BHSD.shape or self.k.dtype != k_BHSD.dtype:
                self.k, self.v = torch.empty_like(k_BHSD), torch.empty_like(v_BHSD)
            self.k.copy_(k_BHSD)
            self.v.copy_(v_BHSD)
            return
        if self.k is None:
            raise RuntimeError("pipefusion: a patch step ran before any full (warm-up) step filled the KV "
                               "buffers; warmup_steps must be >= 1")
        self.k.index_copy_(2, index, k_BHSD)
        self.v.index_copy_(2, index, v_BHSD)


class PFAttention(torch.nn.Module):
    """Sequence attention with the layer's KV buffer: full calls store K/V, patch calls attend over the buffer.

    ``index``: for a patch call, the buffer positions of this call's keys (after the Ulysses all-to-all:
    every Ulysses rank's piece of the patch, rank-major); ``None`` for a full call. ``seq_sizes``: this
    call's tokens per rank of the Ulysses group. ``ring_sizes``: buffer tokens per ring rank (the K/V blocks
    that travel around the ring), ``None`` without ring."""

    def __init__(self, state: KVState, index, scale, gqa, ulysses_group, seq_sizes, backend, ring_group=None,
                 ring_sizes=None):
        super().__init__()
        self.state, self.scale, self.gqa = state, scale, gqa
        self.index = None if index is None else torch.tensor(index, dtype=torch.long)
        self.group, self.sizes, self.backend = ulysses_group, list(seq_sizes), backend
        self.ring_group, self.ring_sizes = ring_group, ring_sizes

    def forward(self, q, k, v, mask=None):
        pg = _resolve(self.group) if self.group else None
        num_heads = q.size(1)
        gqa = self.gqa
        if pg is not None:
            rank = pg.rank()
            q, k, v, mask, gqa = _ulysses_in(q, k, v, mask, pg, rank, self.sizes, self.gqa, sum(self.sizes), 0)
        if self.index is not None and self.index.device != k.device:
            self.index = self.index.to(k.device)     # once: the positions are static
        index = self.index
        self.state.write(k, v, index)
        if index is not None:
            k, v = self.state.k, self.state.v
        if self.ring_group:
            rpg = _resolve(self.ring_group)
            out = _ring(q, k, v, mask, self.scale, rpg, rpg.rank(), self.ring_sizes, gqa, self.backend)
        else:
            out = _local_attention(q, k, v, mask, self.scale, gqa, self.backend)
        if pg is not None:
            return _ulysses_out(out, pg, rank, self.sizes, num_heads)
        return out.contiguous()


# --- running a split graph --------------------------------------------------------------------------------


class Program:
    """A ``split_module`` result read as: partition 0 = prologue, 1..N = stages, N + 1 = epilogue (optional).

    ``carry[s]``: top-level values stage s hands to stage s + 1 (made by stages <= s, read later)."""

    def __init__(self, top: fx.GraphModule, num_stages: int):
        self.top, self.n = top, num_stages
        self.part: dict[fx.Node, int] = {}
        self.calls: list[tuple[int, fx.Node]] = []
        for node in top.graph.nodes:
            if node.op == "call_module":
                p = int(node.target.rsplit("_", 1)[1])
                self.part[node] = p
                self.calls.append((p, node))
            elif node.op == "call_function" and node.target is operator.getitem:
                self.part[node] = self.part[node.args[0]]
        self.output = next(n for n in top.graph.nodes if n.op == "output")
        self.placeholders = [n for n in top.graph.nodes if n.op == "placeholder"]

        def readers(v):
            out = set()
            for u in v.users:
                if u.op == "output":
                    out.add(num_stages + 1)
                elif u.target is operator.getitem:
                    out |= readers(u)
                else:
                    out.add(self.part[u])
            return out
        values = [v for v in self.part if not (v.op == "call_module" and any(
            u.target is operator.getitem for u in v.users))]
        self.carry = []
        for s in range(num_stages - 1):
            self.carry.append([v for v in values if 1 <= self.part[v] <= s + 1
                               and any(r > s + 1 for r in readers(v))])
        # top-level value -> the original graph node name it carries (split_module keeps names inside)
        self.name: dict[fx.Node, str] = {}
        for _, node in self.calls:
            out = next(n for n in getattr(top, node.target).graph.nodes if n.op == "output").args[0]
            getitems = [u for u in node.users if u.target is operator.getitem]
            if getitems:
                for u in getitems:
                    self.name[u] = out[u.args[1]].name
            else:
                self.name[node] = (out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out).name
        self.by_name = {v: k for k, v in self.name.items()}
        self.lowered: dict[str, fx.GraphModule] = {}   # partition submodule name -> its lowered stand-in

    def lower_parts(self, parts, lowering: str, stats) -> None:
        """Run partitions ``parts`` through ``lower_around``: Inductor around the PFAttention calls. The
        submodules in ``top`` stay as they were (the displaced loop reads the epilogue's graph)."""
        from ..lowering.around_modules import lower_around
        for p, node in self.calls:
            if p in parts and node.target not in self.lowered:
                self.lowered[node.target] = lower_around(getattr(self.top, node.target), lowering, stats)

    def run_part(self, p: int, env: dict) -> None:
        for q, node in self.calls:
            if q != p:
                continue
            args = fx.node.map_arg(node.args, lambda a: env[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
            mod = self.lowered.get(node.target)
            mod = getattr(self.top, node.target) if mod is None else mod
            env[node] = mod(*args, **kwargs)
            for u in node.users:
                if u.target is operator.getitem:
                    env[u] = env[node][u.args[1]]

    def bind(self, inputs) -> dict:
        return dict(zip(self.placeholders, inputs))


class PipeFusionRunner:
    """The compiled forward: full (warm-up) calls, then patch-pipelined calls with stale KV."""

    def __init__(self, *, full: Program, patches: list[Program], assemble: list, epilogue_inputs: dict,
                 stage: int, num_stages: int, warmup_steps: int, p2p: P2P, out_meta: list, report: dict):
        self.full, self.patches = full, patches
        self.assemble = assemble            # per output of a patch program: (name, dim, index, full shape) | None
        self.epilogue_inputs = epilogue_inputs   # name -> node of full program
        self.stage, self.n, self.warmup = stage, num_stages, warmup_steps
        self.p2p, self.out_meta, self.report = p2p, out_meta, report
        self.calls = 0
        self.bytes_per_call: dict[str, int] = {}   # "full" / "patch" -> P2P bytes this rank sent in its last call
        self.displaced = None     # a DisplacedLoop while api.pipefusion_denoise runs: it takes the patch calls
        # input index -> per patch {dim: (mesh axes, positions of the whole input this rank reads)}; set by
        # the pass for inputs cut into patches at the source (the displaced loop steps the latent by them)
        self.input_boxes: dict = {}

    def lower(self, lowering: str):
        """Lower the partitions this rank runs (its stage, the prologues, the last stage's epilogue), each
        piece on its first call. Returns the live LoweringStats."""
        from ..lowering.around_modules import LoweringStats
        stats = LoweringStats(lowering=lowering)
        mine = {0, self.stage + 1} | ({self.n + 1} if self.last else set())
        for prog in (self.full, *self.patches):
            prog.lower_parts(mine, lowering, stats)
        return stats

    def reset(self) -> None:
        """A new denoising loop: the next ``warmup_steps`` calls run in full again."""
        self.calls = 0

    @property
    def last(self) -> bool:
        return self.stage == self.n - 1

    def __call__(self, *inputs):
        sync = self.calls < self.warmup
        self.calls += 1
        if not sync and self.displaced is not None:
            with torch.no_grad():
                return self.displaced.step(inputs)
        before = self.p2p.bytes_sent
        with torch.no_grad():
            outs = self._full(inputs) if sync else self._patched(inputs)
            out = self._broadcast(outs)
        self.bytes_per_call["full" if sync else "patch"] = self.p2p.bytes_sent - before
        return out

    def _full(self, inputs):
        prog, s = self.full, self.stage
        env = prog.bind(inputs)
        prog.run_part(0, env)
        if s > 0:
            env.update(zip(prog.carry[s - 1], self.p2p.recv(("full",), s - 1)))
        prog.run_part(s + 1, env)
        if s < self.n - 1:
            self.p2p.send(("full",), [env[v] for v in prog.carry[s]], s + 1)
        if not self.last:
            return None
        prog.run_part(self.n + 1, env)
        return _outputs(prog, env)

    def _patched(self, inputs):
        s = self.stage
        pieces = []
        for m, prog in enumerate(self.patches):
            env = prog.bind(inputs)
            prog.run_part(0, env)
            if s > 0:
                env.update(zip(prog.carry[s - 1], self.p2p.recv(("patch", m), s - 1)))
            prog.run_part(s + 1, env)
            if s < self.n - 1:
                self.p2p.send(("patch", m), [env[v] for v in prog.carry[s]], s + 1)
            else:
                pieces.append(_outputs(prog, env))
        if not self.last:
            return None
        # The epilogue runs once on the whole sequence: the last stage's patch outputs put back in place.
        full = self.full
        env = full.bind(inputs)
        full.run_part(0, env)
        for i, spec in enumerate(self.assemble):
            name, dim, index, shape = spec
            node = self.epilogue_inputs[name]
            if dim is None:
                env[node] = pieces[-1][i]
                continue
            buf = pieces[0][i].new_empty(shape)
            for m, outs in enumerate(pieces):
                buf.index_copy_(dim, index[m].to(buf.device), outs[i])
            env[node] = buf
        full.run_part(self.n + 1, env)
        return _outputs(full, env)

    def _broadcast(self, outs):
        self.p2p.wait_sends()
        if self.n == 1:
            return outs
        tensors = []
        if outs is None:
            outs = [torch.empty(s, dtype=d, device=self.p2p.device) if s is not None else None
                    for s, d in self.out_meta]
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        self.p2p.broadcast(tensors, self.n - 1)
        it = iter(tensors)
        return tuple(next(it) if isinstance(o, torch.Tensor) else o for o in outs)


def _outputs(prog: Program, env: dict) -> list:
    args = prog.output.args[0]
    args = args if isinstance(args, (tuple, list)) else (args,)
    return [env[a] if isinstance(a, fx.Node) else a for a in args]


@torch.library.custom_op("xdit::pipe_split", mutates_args=())
def pipe_split() -> None:
    """Structural marker: a stage boundary (as ``torch.distributed.pipelining``'s ``pipe_split``); no-op."""
    return None


@pipe_split.register_fake
def _() -> None:
    return None
