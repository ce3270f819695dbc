"""The dynamo backend: XditCompiler(plan)(gm, example_inputs) -> callable.

Registered as "xdit" through the `torch_dynamo_backends` entry point, so
`torch.compile(m, backend="xdit", options={"plan": plan_or_path})` works without importing this package.
Each captured subgraph runs the pass pipeline (passes/manager.py), then the plan's lowering. What every
subgraph became is kept in `compiler.reports` for `explain`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from . import runtime  # noqa: F401  (registers the xdit:: custom ops)
from .lowering import lower
from .passes.manager import run_passes
from .runtime._lse import resolve_backend
from .plan import Plan, load_plan


@dataclass
class CompileContext:
    """Per-subgraph state of one compile: degrees, group names, what the passes found."""
    dims: object
    attention_backend: str = "auto"
    disabled_passes: frozenset = frozenset()
    timings: dict = field(default_factory=dict)
    attention_report: list = field(default_factory=list)
    analysis: object = None
    unit_axis: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    cfg_external: bool = False
    seq_class: object = None
    shard: object = None
    cache_config: object = None        # plan.cache
    model_class: str | None = None     # the compiled model's class name (published TeaCache coefficients)
    example_inputs: list = field(default_factory=list)
    cache_info: object = None          # runtime.cache.CacheGraphInfo when insert_cache_skip rewrote the graph
    cache_report: dict | None = None
    lowering: str = "eager"            # plan.compile.lowering
    decompose_collectives: bool = False   # plan.compile.decompose_collectives (used with lowering inductor)
    ulysses_chunks: int = 1            # plan.compile.ulysses_chunks (decompose_ulysses)
    query_parts: int = 1               # plan.compile.query_parts (decompose_ulysses, copy_engine)
    ce_in_place: bool = True           # plan.compile.ce_in_place (decompose_ulysses, copy_engine)
    all_to_all: str = "nccl"           # plan.compile.all_to_all as run (decompose_ulysses; all_to_all_mode)
    ring_transfer: str = "nccl"        # plan.compile.ring_transfer as run (rewrite_attention; ring_transfer_mode)
    shard_modulation: bool = True      # plan.compile.shard_modulation
    fuse_modulation: bool = False      # plan.compile.fuse_modulation
    modulation_report: list = field(default_factory=list)   # shard_modulation: one record per all-gather
    transfer_report: dict = field(default_factory=dict)     # schedule_transfers: linears split, nodes moved
    fuse_gelu: bool = True             # plan.compile.fuse_gelu
    fuse_norm_rope: bool = True        # plan.compile.fuse_norm_rope
    fuse_linears: bool = True          # plan.compile.fuse_linears
    split_cat_linears: bool = True     # plan.compile.split_cat_linears
    fuse_report: dict = field(default_factory=dict)         # fuse_gelu / fuse_norm_rope: how many fused
    ce_buffers: list = field(default_factory=list)          # decompose_ulysses: copy-engine buffers to make first
    ce_reserved: list = field(default_factory=list)         # their keys, made before the graph first runs
    symm_buffers: list = field(default_factory=list)        # decompose_ulysses: symm_all_to_all buffers to make first

    @property
    def pipefusion(self) -> bool:
        return self.dims.axis_size("pipefusion") > 1

    @property
    def ulysses(self) -> int:
        return self.dims.axis_size("ulysses")

    @property
    def ring(self) -> int:
        return self.dims.axis_size("ring")

    @property
    def sp_size(self) -> int:
        return self.ulysses * self.ring

    @property
    def cfg_size(self) -> int:
        return self.dims.axis_size("cfg")

    @property
    def cfg_rank(self) -> int:
        return self.dims.axis_rank("cfg")

    @property
    def cfg_split(self) -> bool:
        """Split a batched [uncond, cond] call over the cfg axis (unless a pipeline hook runs the two
        calls on the two halves of the ranks itself)."""
        return self.cfg_size > 1 and not self.cfg_external

    @property
    def sp_rank(self) -> int:
        return self.dims.axis_rank("ring") * self.ulysses + self.dims.axis_rank("ulysses")

    def group_name(self, axis: str) -> str:
        if axis == "sp":
            return self.dims.sp_group.group_name
        if axis == "cfg+sp":
            return self.dims.group_name("replica")
        return self.dims.group_name(axis)


def _device_type(example_inputs) -> str:
    import torch
    return "cuda" if any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs) else "cpu"


def all_to_all_mode(mode: str, lowering: str, device_type: str, ulysses: int = 1, world: int = 1,
                    local_gpus: int | None = None) -> str:
    """compile.all_to_all as run. "auto" is copy_engine under Inductor on CUDA when Ulysses spans the whole job
    and every rank's GPU is on this host: the plans measured with it (FLUX 1024² ulysses 4 on 4 x H200: 41.3
    against 46.1 ms/step with nccl; Wan 480p ulysses 4: 781.9). Else nccl: on CPU, with the eager lowering, over
    several nodes, and where Ulysses is a subgroup (cfg / data / ring x ulysses), whose copy-engine path has
    not run on GPUs yet. The same answer on every rank of a uniform job."""
    if mode != "auto":
        return mode
    if lowering != "inductor" or device_type != "cuda" or ulysses < 2 or ulysses != world:
        return "nccl"
    if local_gpus is None:
        import torch
        local_gpus = torch.cuda.device_count()
    return "copy_engine" if world <= local_gpus else "nccl"


def ring_transfer_mode(mode: str, device_type: str, ring: int = 1, world: int = 1, local_gpus: int | None = None) -> str:
    """compile.ring_transfer as run. "auto" is copy_engine on CUDA when the ring spans the whole job (ulysses 1)
    and every rank's GPU is on this host, else nccl. The same answer on every rank of a uniform job."""
    if mode != "auto":
        return mode
    if device_type != "cuda" or ring < 2 or ring != world:
        return "nccl"
    if local_gpus is None:
        import torch
        local_gpus = torch.cuda.device_count()
    return "copy_engine" if world <= local_gpus else "nccl"


class XditCompiler:
    def __init__(self, plan: Plan, dims=None, disabled_passes=()):
        from .mesh import ParallelDims
        self.plan = plan
        reason = plan.unsupported_reason()
        if reason:
            raise ValueError(reason)
        self.dims = dims if dims is not None else ParallelDims.from_plan(plan.parallel)
        self.disabled = frozenset(disabled_passes)
        self.cfg_external = False
        self.reports: list[dict] = []
        self.pipefusion_runners: list = []
        self.free_ids: set[int] = set()   # parameter tensors of other pipefusion stages (api.py drops them)
        from .runtime.cache import CacheController
        self.cache = CacheController(plan.cache)
        self.model_class: str | None = None     # set by parallelize()

    def __call__(self, gm: fx.GraphModule, example_inputs):
        from .runtime import fused_linear
        try:
            return self._compile(gm, example_inputs)
        finally:     # fuse_linears: parameters become views of their joined weights only once the graph is lowered
            fused_linear.join_pending()

    def _compile(self, gm: fx.GraphModule, example_inputs):
        ctx = CompileContext(dims=self.dims,
                             attention_backend=resolve_backend(self.plan.attention.backend, _device_type(example_inputs)),
                             disabled_passes=self.disabled, cfg_external=self.cfg_external,
                             cache_config=self.plan.cache, example_inputs=list(example_inputs),
                             model_class=self.model_class, lowering=self.plan.compile.lowering,
                             decompose_collectives=self.plan.compile.decompose_collectives,
                             ulysses_chunks=self.plan.compile.ulysses_chunks,
                             query_parts=self.plan.compile.query_parts,
                             ce_in_place=self.plan.compile.ce_in_place,
                             all_to_all=all_to_all_mode(self.plan.compile.all_to_all, self.plan.compile.lowering,
                                                        _device_type(example_inputs),
                                                        ulysses=self.dims.axis_size("ulysses"),
                                                        world=self.dims.world_size),
                             ring_transfer=ring_transfer_mode(self.plan.compile.ring_transfer,
                                                              _device_type(example_inputs),
                                                              ring=self.dims.axis_size("ring"),
                                                              world=self.dims.world_size),
                             shard_modulation=self.plan.compile.shard_modulation,
                             fuse_modulation=self.plan.compile.fuse_modulation,
                             fuse_gelu=self.plan.compile.fuse_gelu,
                             fuse_norm_rope=self.plan.compile.fuse_norm_rope,
                             fuse_linears=self.plan.compile.fuse_linears,
                             split_cat_linears=self.plan.compile.split_cat_linears)
        if ctx.pipefusion and "pipefusion" not in self.disabled:
            if self.plan.cache.method != "none":
                raise ValueError(f"cache.method = {self.plan.cache.method!r} with parallel.pipefusion = "
                                 f"{ctx.dims.axis_size('pipefusion')} is not supported in this version; "
                                 "use cache.method = \"none\" or pipefusion = 1")
            return self._pipefusion(gm, example_inputs, ctx)
        if self.plan.cache.method != "none":
            gm = _own_copy(gm)
        gm = run_passes(gm, ctx)
        if ctx.ce_buffers:      # every rank, same order, before the first run (runtime/ce_a2a.reserve says why)
            from .runtime import ce_a2a
            ctx.ce_reserved = ce_a2a.reserve(ctx.ce_buffers)
        if ctx.symm_buffers:
            from .runtime import symm_a2a
            symm_a2a.reserve(ctx.symm_buffers)
        _warn_if_idle(gm, ctx)
        self.reports.append(_report(gm, ctx, len(self.reports)))
        comp = self.plan.compile
        opts = {"cudagraphs": comp.cudagraphs, "overlap": comp.overlap, "max_autotune": comp.max_autotune}
        if ctx.cache_info is None:
            return lower(gm, example_inputs, comp.lowering, **opts)
        import torch
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        state = [torch.full(s.shape, s.init, dtype=s.dtype, device=device) for s in ctx.cache_info.state]
        extra = [self.cache.mode_tensor(0, device), self.cache.threshold_tensor(None, device)]
        fn = lower(gm, [*example_inputs, *state, *extra], comp.lowering, **opts)
        return self.cache.wrap(fn, ctx.cache_info)

    def _pipefusion(self, gm, example_inputs, ctx):
        import time
        import warnings

        from .passes.pipefusion import build_pipefusion
        t0 = time.perf_counter()
        cfg = self.plan.pipefusion
        runner, free, pf = build_pipefusion(
            gm, example_inputs, ctx, run_passes, num_patches=cfg.patches(ctx.dims.axis_size("pipefusion")),
            warmup_steps=cfg.warmup_steps)
        ctx.timings["pipefusion"] = time.perf_counter() - t0
        lowering = self.plan.compile.lowering
        if lowering == "inductor":
            # Inductor around the stateful PFAttention calls, each piece compiled on its first call
            pf["lowering"] = runner.lower(lowering)
            if self.plan.compile.cudagraphs or self.plan.compile.overlap:
                warnings.warn("xdit: compile.cudagraphs / compile.overlap are not applied to pipefusion stages in "
                              "this version (their pieces are compiled by plain Inductor)", stacklevel=2)
        elif lowering != "eager":
            warnings.warn(f"xdit: pipefusion stages run eagerly (compile.lowering={lowering!r} is not applied "
                          "to them in this version; use inductor)", stacklevel=2)
        self.free_ids |= free
        self.pipefusion_runners.append(runner)
        rep = _report(gm, ctx, len(self.reports))
        rep["pipefusion"] = pf
        rep["pipefusion_runner"] = runner
        self.reports.append(rep)
        return runner


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's graph: the cache pass adds placeholders (state inputs), and dynamo reads its own
    graph's placeholders after the backend returns."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def _warn_if_idle(gm, ctx):
    """Say so when the plan parallelizes nothing in this graph, or Ulysses must pad heads."""
    import warnings
    if ctx.sp_size > 1 and not any(a for a, ax in ctx.unit_axis.items() if ax == "sp"):
        warnings.warn("xdit: found no self-attention sequence to shard in this graph; every rank computes it "
                      "whole (correct, no speed-up)", stacklevel=2)
    for a in ctx.attention_report:
        heads = a["q"][1] if a.get("q") else None
        if heads and "ulysses" in a.get("became", "") and heads % ctx.ulysses:
            warnings.warn(f"xdit: attention {a['node']} has {heads} heads, which ulysses={ctx.ulysses} does not "
                          "divide: heads are zero-padded (correct, slower); prefer a ulysses degree that divides "
                          "the head count and put the rest in ring", stacklevel=2)
            break


def _report(gm, ctx, index) -> dict:
    events = ctx.shard.events if ctx.shard is not None else []
    an = ctx.analysis
    unit_sizes = []
    if an is not None:
        unit_sizes = [an.classes.size[u] for u, a in ctx.unit_axis.items() if a == "sp"]
    return {
        "subgraph": index,
        "sp_size": ctx.sp_size,
        "units": unit_sizes,
        "cfg_batch": [an.classes.size[u] for u, a in ctx.unit_axis.items() if a == "cfg"] if an else [],
        "attention": ctx.attention_report,
        "modulation": ctx.modulation_report,
        "transfers": ctx.transfer_report,
        "fused": ctx.fuse_report,
        "ce_reserved": ctx.ce_reserved,
        "events": events,
        "unknown_ops": sorted({str(v) for v in an.unknown.values()}) if an is not None else [],
        "timings": dict(ctx.timings),
        "cache": ctx.cache_report,
        "graph": gm,
        "ends_at": _ends_at(gm),
    }


def _ends_at(gm) -> str:
    """file:line of the last traced op of a graph (where dynamo stopped, for graph-break warnings)."""
    for n in reversed(list(gm.graph.nodes)):
        st = n.meta.get("stack_trace")
        if st:
            lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip().startswith("File ")]
            if lines:
                return lines[-1].replace("File ", "").split(", in ")[0].replace('"', "")
    return "?"


def xdit_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    """Entry point for `torch.compile(backend="xdit", options={"plan": ...})`."""
    options = dict(options or {})
    plan = load_plan(options.pop("plan", {}))
    disabled = options.pop("disable_passes", ())
    if options:
        raise ValueError(f"unknown xdit backend option(s) {sorted(options)}; valid: plan, disable_passes")
    return XditCompiler(plan, disabled_passes=disabled)(gm, example_inputs)
