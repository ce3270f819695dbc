"""Displaced PipeFusion: the pipeline runs across denoising steps, not per step (issue 5).

Terms: task (s, i, m) = stage s running patch m of step i; N stages, M patches; *latent patch* = the
latent's tokens at patch m's positions (``PipeFusionRunner.input_patches``).

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
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .pipefusion import _outputs

_MSG_BYTES = 1024


class DisplacedLoop:
    """One rank's state for one displaced denoising loop; ``step`` runs pipelined step ``i``."""

    def __init__(self, runner, *, num_steps: int, step_fn, latent: torch.Tensor, latent_group):
        self.r, self.num_steps, self.step_fn = runner, num_steps, step_fn
        self.latent, self.pg = latent, latent_group
        self.ranks = dist.get_process_group_ranks(latent_group)
        self.i = -1
        self.x = None              # this rank's copy of the whole latent, updated patch by patch
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
        if k not in r.input_patches:
            raise ValueError("pipefusion_denoise: the latent input is not cut into patches at the graph's "
                             "input for this model, so the last stage cannot step it patch by patch; use "
                             "model(...) per step (the per-call schedule)")
        self.k = k
        self.dim, pos = r.input_patches[k]
        dev = self.latent.device
        self.pos = [p.to(dev) for p in pos]
        self.x = self.latent.clone()
        self.shapes = [tuple(self.x.index_select(self.dim, p).shape) for p in self.pos]
        msg = check_epilogue(r, self._with_x(inputs), self.x, self.dim, self.pos) if r.last else ""
        buf = torch.zeros(_MSG_BYTES, dtype=torch.uint8, device=r.p2p.device)
        if msg:
            raw = msg.encode()[:_MSG_BYTES]
            buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        r.p2p.broadcast([buf], r.n - 1)
        text = bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
        if text:
            raise ValueError(f"pipefusion_denoise: {text}; use model(...) per step (the per-call schedule)")

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
                buf = torch.empty(self.shapes[m], dtype=self.x.dtype, device=self.x.device)
                dist.recv(buf, self.ranks[n - 1], group=self.pg)
                self.x.index_copy_(self.dim, self.pos[m], buf)
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
            v = run_epilogue(r, env_full, _outputs(prog, env))
            x_m = self.x.index_select(self.dim, self.pos[m])
            new = self.step_fn(x_m, v, i).to(self.x.dtype).contiguous()
            self.x.index_copy_(self.dim, self.pos[m], new)
            if not final:
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
            r.p2p.broadcast([self.x], n - 1)
            self.result = self.x
        # average over the loop's pipelined steps (the last one sends no latent patches)
        r.bytes_per_call["displaced"] = (r.p2p.bytes_sent - self.start_bytes + self.bytes_sent) // self.num_pipelined
        return self._placeholder_outputs()

    def _placeholder_outputs(self) -> tuple:
        """What the compiled forward returns for a displaced step: right shapes, no meaning (the loop reads
        ``result``)."""
        if not hasattr(self, "_dummy"):
            self._dummy = tuple(torch.empty(sh, dtype=d, device=self.x.device) if sh is not None else None
                                for sh, d in self.r.out_meta)
        return self._dummy


def run_epilogue(r, env_full: dict, stack_outputs: list) -> torch.Tensor:
    """The full program's epilogue on the given block-stack outputs; its first tensor output."""
    env = dict(env_full)
    for spec, val in zip(r.assemble, stack_outputs):
        env[r.epilogue_inputs[spec[0]]] = val
    r.full.run_part(r.n + 1, env)
    return next(o for o in _outputs(r.full, env) if isinstance(o, torch.Tensor))


def check_epilogue(r, inputs, x, dim, pos) -> str:
    """'' if the epilogue can run per patch (checked on random stack outputs), else why not."""
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
    for m, p in enumerate(pos):
        try:
            part = run_epilogue(r, env, [v.index_select(spec[1], spec[2][m].to(v.device))
                                         for v, spec in zip(vals, r.assemble)])
        except Exception as e:  # noqa: BLE001 (literal whole-sequence shapes in the epilogue, for one)
            return f"the epilogue does not run on one patch ({type(e).__name__}: {str(e)[:200]})"
        ref = whole.index_select(dim, p)
        if part.shape != ref.shape or ((part.float() - ref.float()).norm() > tol * ref.float().norm()):
            return (f"the epilogue is not token-local (run on patch {m} it does not give the whole-sequence "
                    "epilogue's rows at that patch's positions)")
    return ""
