"""Displaced PipeFusion: the pipeline runs across denoising steps, not per step (issue 5).

Terms: task (s, i, m) = stage s running patch m of step i; N stages, M patches; *latent patch* = the
latent's tokens at patch m's positions (``PipeFusionRunner.input_boxes``).

Per-call schedule (runtime/pipefusion.py): step i's M patches go through the N stages, the last stage
assembles them, runs the epilogue and broadcasts the output; the caller then steps the whole latent. Every
step fills and drains the pipeline: M + N - 1 patch times.

Displaced schedule (this module, driven by ``api.pipefusion_denoise``): the last stage runs the epilogue on
each patch as it arrives, applies the scheduler step to that latent patch (``step_fn(x_m, v_m, i)``) and
sends the updated patch to the other stages (non-blocking). Stage 0 starts patch m of step i + 1 as soon as
it has that patch, while the later stages still work on step i: after warm-up the pipeline stays full,
M patch times per step (plus N - 1 once at the end). Every stage receives the latent patch (not only stage
0), so a prologue value that a later stage reads is right too.

No deadlock for any N, M: a task waits only on tasks earlier in (step, patch, stage) order (its input from
stage s - 1, its latent patch from (N - 1, i - 1, m), the previous task of its own stage); sends are
non-blocking, a stage's sends of step i - 1 are waited at the end of step i, and each pair of ranks sees its
messages in one fixed order. Latent patches travel on a process group of their own, so on NCCL the
activations (s -> s + 1) and the latent patches (N - 1 -> s) of one pair of ranks do not queue behind each
other on one communicator. M < N works, with bubbles: stage 0 then waits for the last stage every step.

K/V staleness is the per-call schedule's: each stage runs its patches in order, so when (s, i, m) attends,
its buffer holds patches < m of step i and patches >= m of step i - 1, exactly as in a per-call patch step.
The results equal the per-call loop up to the order of floating-point ops in the per-patch epilogue.

The epilogue runs per patch: ``check_epilogue`` verifies once per loop (on random stack outputs) that the
epilogue run on a patch gives the whole-sequence epilogue's rows at the patch's latent positions (token-local,
output laid out like the latent), and every rank refuses the loop with the reason otherwise.

Hybrids (pipefusion x ulysses / ring / cfg / data). A rank's *box* for patch m is the part of the latent its patch
program reads: the patch's tokens inside its sequence-parallel (``sp`` = ring x ulysses) shard, and with a cfg split the batch
rows of its cfg half (``PipeFusionRunner.input_boxes``). Latent patches travel on the pipefusion axis only:
the last stage's rank with coordinates (data d, cfg c, sp j) sends its box to the rank (d, c, j) of every
other stage, so a rank's copy of the latent is current inside its boxes only (a check at setup runs each
patch prologue with the latent changed outside the box and refuses the loop if anything it makes changes).
The epilogue runs per patch LOCAL: the full program's epilogue with its gathers dropped gives the output at
the box. With a cfg split the last stage's cfg ranks all-gather that piece along the batch dim, so
``step_fn`` sees the model's whole batch ([uncond, cond]) for the patch and can apply guidance; both cfg
ranks step the patch the same way and each sends on its own rows. After the last step the last stage
assembles the latent over its sp ranks (each holds its own tokens) and broadcasts it over the pipefusion
axis. Data replicas share no group with each other here: each runs its own loop.
"""
from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.fx as fx

from . import tokens
from .pipefusion import _outputs


class DisplacedLoop:
    """One rank's state for one displaced denoising loop; ``step`` runs pipelined step ``i``.

    ``groups``: ``"cfg"`` / ``"sp"`` / ``"replica"`` (cfg x sp) process groups of this rank where that degree
    is > 1, else absent."""

    def __init__(self, runner, *, num_steps: int, step_fn, latent: torch.Tensor, latent_group, groups=None):
        self.r, self.num_steps, self.step_fn = runner, num_steps, step_fn
        self.latent, self.pg = latent, latent_group
        self.groups = dict(groups or {})
        self.ranks = dist.get_process_group_ranks(latent_group)
        self.i = -1
        self.x = None              # this rank's copy of the whole latent, current inside its boxes
        self.pending, self.prev_pending = [], []
        self.result = None
        self.bytes_sent = 0        # latent patches this rank sent
        self.num_pipelined = 0
        self.start_bytes = runner.p2p.bytes_sent

    # --- setup, once per loop, on every rank ------------------------------------------------------------

    def _setup(self, inputs) -> None:
        r = self.r
        k = next((j for j, t in enumerate(inputs) if t is self.latent), None)
        if k is None:
            raise ValueError("pipefusion_denoise: the latent is not an input of the compiled graph (was it "
                             "passed under another keyword? see latent_kwarg)")
        boxes = r.input_boxes.get(k)
        if not boxes:
            raise ValueError("pipefusion_denoise: the latent input is not cut into patches at the graph's "
                             "input for this model, so the last stage cannot step it patch by patch; use "
                             "model(...) per step (the per-call schedule)")
        self.k = k
        self.x = self.latent.clone()
        self.epi = local_epilogue(r)
        text = self._agree(self._layout(boxes))
        if not text and self.hybrid:
            text = self._agree(self._check_reads(inputs))
        if not text:
            text = self._agree(check_epilogue(r, self._with_x(inputs), self.x, self.read, self.epi)
                               if r.last else "")
        if text:
            raise ValueError(f"pipefusion_denoise: {text}; use model(...) per step (the per-call schedule)")

    def _layout(self, boxes) -> str:
        """This rank's boxes: ``read[m]`` (what patch m reads), ``step_box[m]`` (what the last stage steps:
        the read box over the whole batch); '' or why the latent's split does not fit the loop."""
        dev = self.x.device
        axes = {d: a for d, (a, _) in boxes[0].items()}
        tok = [d for d, a in axes.items() if a == ("sp",)]
        cfg = [d for d, a in axes.items() if a == ("cfg",)]
        if len(tok) != 1 or len(cfg) > 1 or len(axes) != len(tok) + len(cfg):
            return (f"the latent input is not split along one sequence dim (and at most one cfg batch dim): "
                    f"its split dims are {axes}")
        self.tok_dim, self.cfg_dim = tok[0], (cfg[0] if cfg else None)
        self.tok_pos = [b[self.tok_dim][1].to(dev) for b in boxes]
        self.step_box = [{self.tok_dim: p} for p in self.tok_pos]
        self.read = [dict(b) for b in self.step_box]
        self.hybrid = self.cfg_dim is not None or "sp" in self.groups
        if "sp" in self.groups:
            mine = torch.cat(self.tok_pos).tolist()
            every = [q for got in _all_objects(mine, self.groups["sp"]) for q in got]
            if sorted(every) != list(range(self.x.shape[self.tok_dim])):
                return "the sequence-parallel ranks' patches do not cover the latent's tokens exactly once"
        if self.cfg_dim is not None:
            self.cfg_rows = boxes[0][self.cfg_dim][1].to(dev)
            for b in self.read:
                b[self.cfg_dim] = self.cfg_rows
            rows = _all_objects(self.cfg_rows.tolist(), self.groups["cfg"])
            flat = [q for got in rows for q in got]
            if len({len(got) for got in rows}) != 1 or sorted(flat) != list(range(self.x.shape[self.cfg_dim])):
                return f"the cfg ranks' batch rows {rows} are not an even split of the latent's batch"
            self.cfg_order = (None if flat == sorted(flat) else
                              torch.tensor(flat, dtype=torch.long, device=dev))
        self.recv_shapes = [tuple(_box_select(self.x, b).shape) for b in self.read]
        return ""

    def _check_reads(self, inputs) -> str:
        """'' if each patch prologue reads the latent only inside this rank's box (the rest of its copy is
        stale), else why not."""
        for m, prog in enumerate(self.r.patches):
            other = self.x + 1
            _box_copy_(other, self.read[m], _box_select(self.x, self.read[m]))
            envs = []
            for x in (self.x, other):
                ins = list(inputs)
                ins[self.k] = x
                env = prog.bind(ins)
                prog.run_part(0, env)
                envs.append(env)
            for node, a in envs[0].items():
                if node.op != "placeholder" and isinstance(a, torch.Tensor) and not torch.equal(a, envs[1][node]):
                    return (f"patch {m}'s prologue reads latent positions outside this rank's part of the patch "
                            f"({node.name}), which the displaced loop does not send to it")
        return ""

    def _agree(self, msg: str) -> str:
        """The first non-empty message of any rank of this model replica (cfg x sp, then pipefusion)."""
        for pg in (self.groups.get("replica"), self.pg):
            if pg is not None:
                msg = next((t for t in _all_objects(msg, pg) if t), "")
        return msg

    def _with_x(self, inputs) -> list:
        inputs = list(inputs)
        inputs[self.k] = self.x
        return inputs

    # --- one pipelined step --------------------------------------------------------------------------------

    def step(self, inputs) -> tuple:
        r, i = self.r, self.i
        first = self.x is None
        if first:
            self._setup(inputs)
        inputs = self._with_x(inputs)
        s, n, last = r.stage, r.n, r.last
        final = i == self.num_steps - 1
        self.num_pipelined += 1
        env_full = None
        for m, prog in enumerate(r.patches):
            if not first and not last:
                buf = torch.empty(self.recv_shapes[m], dtype=self.x.dtype, device=self.x.device)
                dist.recv(buf, self.ranks[n - 1], group=self.pg)
                _box_copy_(self.x, self.read[m], buf)
            env = prog.bind(inputs)
            prog.run_part(0, env)
            if s > 0:
                env.update(zip(prog.carry[s - 1], r.p2p.recv(("patch", m), s - 1)))
            prog.run_part(s + 1, env)
            if not last:
                r.p2p.send(("patch", m), [env[v] for v in prog.carry[s]], s + 1)
                continue
            if env_full is None:        # step i's timestep-dependent prologue values the epilogue reads
                env_full = r.full.bind(inputs)
                r.full.run_part(0, env_full)
            v = run_local_epilogue(r, self.epi, env_full, _outputs(prog, env))
            if self.cfg_dim is not None:
                v = self._cfg_gather(v)
            x_m = _box_select(self.x, self.step_box[m])
            new = self.step_fn(x_m, v, i).to(self.x.dtype).contiguous()
            _box_copy_(self.x, self.step_box[m], new)
            if not final:
                if self.cfg_dim is not None:
                    new = new.index_select(self.cfg_dim, self.cfg_rows)
                for t in range(n - 1):
                    self.pending.append((dist.isend(new, self.ranks[t], group=self.pg), new))
                    self.bytes_sent += new.numel() * new.element_size()
        old, self.prev_pending = self.prev_pending, r.p2p.pending + self.pending
        r.p2p.pending, self.pending = [], []
        for w, _ in old:
            w.wait()
        if final:
            for w, _ in self.prev_pending:
                w.wait()
            self.prev_pending = []
            if last and "sp" in self.groups:
                self._assemble_sp()
            r.p2p.broadcast([self.x], n - 1)
            self.result = self.x
        # average over the loop's pipelined steps (the last one sends no latent patches)
        r.bytes_per_call["displaced"] = (r.p2p.bytes_sent - self.start_bytes + self.bytes_sent) // self.num_pipelined
        return self._placeholder_outputs()

    def _cfg_gather(self, v: torch.Tensor) -> torch.Tensor:
        """The patch's output over the whole batch, from each cfg rank's rows."""
        pg = self.groups["cfg"]
        bufs = [torch.empty_like(v) for _ in range(pg.size())]
        dist.all_gather(bufs, v.contiguous(), group=pg)
        out = torch.cat(bufs, self.cfg_dim)
        if self.cfg_order is None:
            return out
        return out.index_copy(self.cfg_dim, self.cfg_order, out)   # rows in rank order -> rows in batch order

    def _assemble_sp(self) -> None:
        """Each last-stage sp rank holds its own tokens of the final latent: sum the disjoint parts."""
        own = torch.cat(self.tok_pos)
        out = torch.zeros_like(self.x)
        out.index_copy_(self.tok_dim, own, self.x.index_select(self.tok_dim, own))
        dist.all_reduce(out, group=self.groups["sp"])
        self.x = out

    def _placeholder_outputs(self) -> tuple:
        """What the compiled forward returns for a displaced step: right shapes, no meaning (the loop reads
        ``result``)."""
        if not hasattr(self, "_dummy"):
            self._dummy = tuple(torch.empty(sh, dtype=d, device=self.x.device) if sh is not None else None
                                for sh, d in self.r.out_meta)
        return self._dummy


def _all_objects(obj, pg) -> list:
    out = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out


def _box_select(x: torch.Tensor, box: dict) -> torch.Tensor:
    for d, p in box.items():
        x = x.index_select(d, p)
    return x


def _box_copy_(x: torch.Tensor, box: dict, val: torch.Tensor) -> None:
    """x[box] = val, for a box over one or more dims."""
    (d, p), *rest = box.items()
    if rest:
        part = x.index_select(d, p)
        _box_copy_(part, dict(rest), val)
        val = part
    x.index_copy_(d, p, val)


def local_epilogue(r) -> dict:
    """The full program's epilogue modules with their gathers dropped: run on LOCAL block-stack values they
    give this rank's part of the output (checked against the whole epilogue by ``check_epilogue``)."""
    mods = {}
    for p, node in r.full.calls:
        if p != r.n + 1:
            continue
        mod = getattr(r.full.top, node.target)
        if not isinstance(mod, fx.GraphModule):
            mods[node] = mod
            continue
        g = fx.Graph()
        g.output(g.graph_copy(mod.graph, {}))
        for u in list(g.nodes):
            if u.op == "call_function" and u.target is tokens.gather:
                u.replace_all_uses_with(u.args[0])
                g.erase_node(u)
        mods[node] = fx.GraphModule(mod, g)
    return mods


def _epilogue_env(r, env_full: dict, stack_outputs: list) -> dict:
    env = dict(env_full)
    for spec, val in zip(r.assemble, stack_outputs):
        env[r.epilogue_inputs[spec[0]]] = val
    return env


def _first_tensor(r, env) -> torch.Tensor:
    return next(o for o in _outputs(r.full, env) if isinstance(o, torch.Tensor))


def run_epilogue(r, env_full: dict, stack_outputs: list) -> torch.Tensor:
    """The full program's epilogue on the given block-stack outputs; its first tensor output."""
    env = _epilogue_env(r, env_full, stack_outputs)
    r.full.run_part(r.n + 1, env)
    return _first_tensor(r, env)


def run_local_epilogue(r, mods: dict, env_full: dict, stack_outputs: list) -> torch.Tensor:
    """``run_epilogue`` with the modules of ``local_epilogue``: this rank's part of the first tensor output."""
    env = _epilogue_env(r, env_full, stack_outputs)
    for node, mod in mods.items():
        env[node] = mod(*fx.node.map_arg(node.args, lambda a: env[a]),
                        **fx.node.map_arg(node.kwargs, lambda a: env[a]))
        for u in node.users:
            if u.target is operator.getitem:
                env[u] = env[node][u.args[1]]
    return _first_tensor(r, env)


def check_epilogue(r, inputs, x, boxes, mods) -> str:
    """'' if the epilogue can run per patch (checked on random stack outputs), else why not. ``boxes[m]``:
    where this rank's part of patch m sits in the latent."""
    bad = [spec[0] for spec in r.assemble if spec[1] is None]
    if bad:
        return f"the epilogue reads block-stack values that are not cut into patches ({', '.join(bad)})"
    env = r.full.bind(inputs)
    r.full.run_part(0, env)
    gen = torch.Generator(device=x.device).manual_seed(0)
    dtypes = getattr(r, "assemble_dtypes", None) or [None] * len(r.assemble)
    vals = [torch.randn(spec[3], dtype=dt or x.dtype, device=x.device, generator=gen)
            for spec, dt in zip(r.assemble, dtypes)]
    whole = run_epilogue(r, env, vals)
    if tuple(whole.shape) != tuple(x.shape):
        return (f"the model output {tuple(whole.shape)} is not laid out like the latent {tuple(x.shape)}, so "
                "it cannot be stepped patch by patch")
    tol = 1e-4 if whole.dtype in (torch.float32, torch.float64) else 2e-2
    for m, box in enumerate(boxes):
        try:
            part = run_local_epilogue(r, mods, env, [v.index_select(spec[1], spec[2][m].to(v.device))
                                                     for v, spec in zip(vals, r.assemble)])
        except Exception as e:  # noqa: BLE001 (literal whole-sequence shapes in the epilogue, for one)
            return f"the epilogue does not run on one patch ({type(e).__name__}: {str(e)[:200]})"
        ref = _box_select(whole, box)
        if part.shape != ref.shape or ((part.float() - ref.float()).norm() > tol * ref.float().norm()):
            return (f"the epilogue is not token-local (run on patch {m} it does not give the whole-sequence "
                    "epilogue's rows at that patch's positions)")
    return ""
