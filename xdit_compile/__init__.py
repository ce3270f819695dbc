"""xdit-compile: sequence-parallel diffusers DiTs by rewriting the dynamo graph."""
from .api import explain, parallelize, unparallelize
from .plan import Plan, load_plan

__all__ = ["parallelize", "unparallelize", "explain", "Plan", "load_plan"]
