"""Plans: the whole recipe of a parallel run (degrees, attention backend, lowering, ...)."""

from .io import load_plan
from .schema import SECTIONS, AttentionConfig, CompileConfig, ParallelConfig, Plan

__all__ = ["AttentionConfig", "CompileConfig", "ParallelConfig", "Plan", "SECTIONS", "load_plan"]
