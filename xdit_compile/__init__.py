"""xdit-compile: sequence-parallel diffusers DiTs by rewriting the dynamo graph."""
from .api import cache_state, cache_summary, explain, parallelize, pipefusion_denoise, unparallelize
from .plan import Plan, load_plan

__all__ = ["parallelize", "unparallelize", "explain", "cache_state", "cache_summary", "pipefusion_denoise", "Plan", "load_plan"]
