"""The pass pipeline: an explicit ordered list built from the plan, each pass timed and disableable.

A pass is `<verb>_<thing>_pass(gm, ctx) -> bool` (modified). After each pass that modified the graph:
`gm.graph.lint(); gm.recompile()`. A failure names the pass and the passes that ran before it.
"""
from __future__ import annotations

import time

import torch.fx as fx

from .attention_kernel import attention_kernel_pass
from .decompose_ulysses import decompose_ulysses_pass
from .find_attention import find_attention_pass
from .fuse_gelu import fuse_gelu_pass
from .fuse_linears import fuse_linears_pass
from .fuse_norm_rope import fuse_norm_rope_pass
from .insert_cache_skip import insert_cache_skip_pass
from .rewrite_attention import rewrite_attention_pass
from .schedule_transfers import schedule_transfers_pass
from .shard_modulation import shard_modulation_pass
from .shard_sequence import Axis, ShardContext, shard_sequence_pass
from .split_cat_linears import split_cat_linears_pass
from .split_cfg import split_cfg_pass


def _shard(gm, ctx):
    axes = {"sp": Axis(ctx.sp_rank, ctx.sp_size, ctx.group_name("sp"))}
    if ctx.cfg_split:
        axes["cfg"] = Axis(ctx.cfg_rank, ctx.cfg_size, ctx.group_name("cfg"))
        axes["cfg+sp"] = Axis(ctx.cfg_rank * ctx.sp_size + ctx.sp_rank, ctx.cfg_size * ctx.sp_size,
                              ctx.group_name("cfg+sp"))
    sctx = ShardContext(an=ctx.analysis, unit_axis=ctx.unit_axis, layout=ctx.layout, axes=axes)
    ctx.shard = sctx
    return shard_sequence_pass(gm, sctx)


def build_pipeline(ctx) -> list[tuple[str, object]]:
    passes = []
    if ctx.sp_size > 1 or ctx.cfg_split:
        passes.append(("find_attention", find_attention_pass))
        if ctx.cfg_split:
            passes.append(("split_cfg", split_cfg_pass))
        passes.append(("shard_sequence", _shard))
    sp_rewrite = ctx.sp_size > 1 and not ctx.pipefusion   # with pipefusion, attention becomes its KV-buffer module
    if sp_rewrite and getattr(ctx, "shard_modulation", True):
        passes.append(("shard_modulation", shard_modulation_pass))
    if getattr(ctx, "fuse_norm_rope", False):   # after sharding: it runs on this rank's tokens and cos / sin
        passes.append(("fuse_norm_rope", fuse_norm_rope_pass))
    if sp_rewrite:
        passes.append(("rewrite_attention", rewrite_attention_pass))
        if ctx.lowering == "inductor" and ctx.decompose_collectives and ctx.ulysses > 1:
            passes.append(("decompose_ulysses", decompose_ulysses_pass))
    if getattr(ctx, "fuse_linears", False):   # before schedule_transfers, which places the transfers around it
        passes.append(("fuse_linears", fuse_linears_pass))
    if sp_rewrite and ctx.lowering == "inductor" and ctx.decompose_collectives and ctx.ulysses > 1 \
            and getattr(ctx, "all_to_all", "nccl") == "copy_engine":
        passes.append(("schedule_transfers", schedule_transfers_pass))
    if getattr(ctx, "split_cat_linears", False):   # after schedule_transfers, which splits (and places) its own
        passes.append(("split_cat_linears", split_cat_linears_pass))
    if getattr(ctx, "fuse_gelu", False):
        passes.append(("fuse_gelu", fuse_gelu_pass))
    if getattr(ctx, "attention_backend", "auto") == "fa3_cute":   # every SDPA in place, decompose_ulysses' too
        passes.append(("attention_kernel", attention_kernel_pass))
    cache = getattr(ctx, "cache_config", None)
    if cache is not None and cache.method != "none":
        # last: it adds state inputs/outputs and matches residuals on the LOCAL (already sharded) shapes
        passes.append(("insert_cache_skip", insert_cache_skip_pass))
    return [(name, fn) for name, fn in passes if name not in ctx.disabled_passes]


def run_passes(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    done = []
    for name, fn in build_pipeline(ctx):
        t0 = time.perf_counter()
        try:
            modified = fn(gm, ctx)
            if modified:
                gm.graph.lint()
                gm.recompile()
        except Exception as e:
            before = ", ".join(done) or "none"
            raise type(e)(f"pass '{name}' failed (passes before it: {before}): {e}") from e \
                if isinstance(e, (ValueError, TypeError, RuntimeError)) else e
        ctx.timings[name] = time.perf_counter() - t0
        done.append(name)
    return gm
