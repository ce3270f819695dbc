"""Lowerings: turn the rewritten fx graph into a callable."""
from __future__ import annotations


# Without a pass list, reorder_for_compute_comm_overlap does nothing; this is the list torch's
# torch/_inductor/config.py recommends: move collectives earlier, waits later, within the peak memory.
OVERLAP_PASSES = [
    "reorder_communication_preserving_peak_memory",
    "sink_waits_iterative",
    "reorder_communication_preserving_peak_memory",
]


def _a2a_start():
    import torch
    return torch.ops.xdit.a2a_start.default


def _register_wait_lowering():
    """xdit.a2a_wait returns a view of a persistent receive buffer. To Inductor it is an ordinary fallback output,
    so once its last reader ran Inductor may hand the same memory to a later buffer of the same size (``bufN =
    bufM; del bufM  # reuse``): the next block's v projection then lands in a receive buffer that peers write
    into (FLUX 2048² on 4 x H100, where v's projection and a receive buffer are both 4224 x 3072). Its outputs
    are marked never-reuse instead; so are those of the producers that write into a receive buffer
    (runtime/ce_in_place.py)."""
    import torch
    from ..runtime import ce_in_place  # noqa: F401  (registers the ops)

    for op in (torch.ops.xdit.a2a_wait.default, torch.ops.xdit.norm_rope_into.default,
               torch.ops.xdit.linears_into.default, torch.ops.xdit.attention_into.default):
        _never_reuse_lowering(op)


def _never_reuse_lowering(op):
    from torch._inductor import ir
    from torch._inductor.lowering import fallback_handler, lowerings, register_lowering
    from torch._inductor.virtualized import V

    if getattr(lowerings.get(op), "_xdit_never_reuse", False):
        return
    fallback = fallback_handler(op, add_to_fallback_set=False)

    def wait_lowering(*args, **kwargs):
        out = fallback(*args, **kwargs)
        x = out
        while not isinstance(x, ir.Buffer) and hasattr(x, "data"):
            x = x.data
        names = {x.get_name()} if isinstance(x, ir.Buffer) else set()
        if isinstance(x, ir.MultiOutput):
            names |= {i.get_name() for i in x.inputs if isinstance(i, ir.Buffer)}
        V.graph.never_reuse_buffers.update(names)
        return out

    wait_lowering._xdit_never_reuse = True
    register_lowering(op, type_promotion_kind=None)(wait_lowering)


def lower(gm, example_inputs, lowering: str, cudagraphs: bool = False, overlap: bool = False,
          max_autotune: bool = False):
    if lowering == "eager":
        return gm.forward
    if lowering == "inductor":
        from torch._inductor.compile_fx import compile_fx
        # CUDA graphs only where every input lives on CUDA (Inductor skips them otherwise, with a log line).
        patches = {"triton.cudagraphs": True} if cudagraphs else {}
        if max_autotune:   # time Triton GEMM templates against cuBLAS per shape, keep the faster
            from torch._inductor import config as inductor_config
            patches.update({"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"})
            if hasattr(inductor_config.triton, "enable_persistent_tma_matmul"):   # torch >= 2.6's TMA template
                patches["triton.enable_persistent_tma_matmul"] = True
        if any(n.target is _a2a_start() for n in gm.graph.nodes):
            _register_wait_lowering()
            # schedule_transfers ordered the graph around the copy-engine transfers; keep that order. Inductor's
            # post-grad reorder_for_locality would move each start right before its wait (a start's only user)
            # and so serialise every transfer; reorder_for_peak_memory would move waits up. StartChoices keeps
            # a kernel that feeds a start out of horizontal fusions (k's rotary would wait for q's projection).
            patches["reorder_for_peak_memory"] = False
            patches["reorder_for_locality"] = False
            from .choices import StartChoices as choices
            from torch._inductor import config as inductor_config
            if hasattr(inductor_config, "inductor_choices_class"):   # keys the FX graph cache
                patches["inductor_choices_class"] = choices
            else:                                                    # older torch: nothing would key it
                patches["fx_graph_cache"] = False
        else:
            choices = None
        if overlap:
            patches.update({"reorder_for_compute_comm_overlap": True,
                            "reorder_for_compute_comm_overlap_passes": list(OVERLAP_PASSES)})
        if choices is None:
            return compile_fx(gm, example_inputs, config_patches=patches)
        from torch._inductor.virtualized import V
        with V.set_choices_handler(choices()):
            return compile_fx(gm, example_inputs, config_patches=patches)
    if lowering == "onediff":
        try:
            import onediff  # noqa: F401
            from onediff.infer_compiler import compile as od_compile
        except ImportError as e:
            raise ValueError(
                "compile.lowering='onediff' needs the optional package onediff (and nexfort, which pins "
                "torch>=2.3,<=2.5.1); install it or use lowering='inductor'") from e
        return od_compile(gm, backend="nexfort")
    raise ValueError(f"compile.lowering={lowering!r} is unknown; use eager, inductor or onediff")
