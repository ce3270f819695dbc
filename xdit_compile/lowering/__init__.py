"""Lowerings: turn the rewritten fx graph into a callable."""
from __future__ import annotations


def lower(gm, example_inputs, lowering: str, cudagraphs: bool = False):
    if lowering == "eager":
        return gm.forward
    if lowering == "inductor":
        from torch._inductor.compile_fx import compile_fx
        # CUDA graphs only where every input lives on CUDA (Inductor skips them otherwise, with a log line).
        patches = {"triton.cudagraphs": True} if cudagraphs else {}
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
