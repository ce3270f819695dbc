"""Per-class help for the compiler, as data: which classes need something before capture, and what.

Almost every diffusers DiT needs nothing: the analysis finds the token dims by itself. A spec exists only
where dynamo cannot capture the attention as a graph. Keyed by class name; `apply_spec(model)` is called by
parallelize() before capture and returns a description of what it changed (for explain); `undo_spec(model)`
(unparallelize) puts the model back.
"""
from __future__ import annotations

from .mochi import restore_attention, use_masked_attention

# class name -> (what it does, apply(model) -> None, undo(model) -> None)
SPECS = {
    "MochiTransformer3DModel": (
        "joint attention with the prompt padding as a key mask (Mochi's processor gathers valid prompt "
        "tokens with torch.nonzero per sample, a graph break)",
        use_masked_attention,
        restore_attention,
    ),
}


def apply_spec(model) -> str | None:
    spec = SPECS.get(type(model).__name__)
    if spec is None:
        return None
    what, apply, _undo = spec
    apply(model)
    return what


def undo_spec(model) -> None:
    spec = SPECS.get(type(model).__name__)
    if spec is not None:
        spec[2](model)
