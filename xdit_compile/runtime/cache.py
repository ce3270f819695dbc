"""Per-request state of the cache-skip pass (passes/insert_cache_skip.py) and the wrapper that feeds it.

The pass adds state *inputs* to the graph (cached residuals, the previous step's statistic tensor, the
TeaCache accumulator, a mode flag) and returns their new values as extra *outputs*; the skip decision and
both branches are inside the graph (``torch.cond``). ``CachedGraph`` is the callable handed back to dynamo:
it appends the current request's state tensors to the arguments and stores the new ones, so nothing is
kept in module globals and two interleaved requests never share a residual.

    state = xdit_compile.cache_state(model, num_steps=28)    # one per generation (pipelines do this)
    with state:
        for t in timesteps:
            model(...)
    state.summary()     # {'steps': 28, 'computed': 17, 'skipped': 11, 'skipped_steps': [...]}

Mode flag per call (an int tensor the graph reads): 0 decide from the statistic, 1 compute, 2 skip.
The first step, the first ``warmup_steps`` steps and, for TeaCache, the last step (when ``num_steps`` is
known) are computed; ``force(step) -> "compute" | "skip" | None`` overrides (benchmarks force a pattern).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

DECIDE, COMPUTE, SKIP = 0, 1, 2

TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    # TeaCache4FLUX (github.com/ali-vilab/TeaCache, teacache_flux.py), highest degree first.
    "FluxTransformer2DModel": (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
}
"""Published TeaCache rescaling polynomials, keyed by diffusers class name (data, not code)."""


@dataclass
class StateSpec:
    """One state tensor of a cached graph: name, local shape, dtype, initial value."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: float = 0.0


@dataclass
class CacheGraphInfo:
    """What the pass put into one graph: how many outputs are the model's, the state it carries."""
    method: str
    num_outputs: int                   # the graph's own outputs; after them: new state, then (skipped, stat)
    state: list[StateSpec]
    report: dict = field(default_factory=dict)


class _Slot:
    """The state of one cached graph within one request."""

    def __init__(self):
        self.tensors: list[torch.Tensor] | None = None
        self.step = 0
        self.skipped: list[torch.Tensor] = []    # 0-dim bool per step, read only in summary() (no sync)
        self.stat: list[torch.Tensor] = []       # 0-dim float per step: the relative change the graph saw


class CacheState:
    """One generation's cache: residuals, accumulator, step counter. Reusable only after ``reset()``."""

    def __init__(self, controller: "CacheController | None" = None, *, num_steps: int | None = None,
                 force: Callable[[int], str | None] | None = None, threshold: float | None = None):
        self.controller = controller
        self.num_steps = num_steps
        self.threshold = threshold          # None: the plan's cache.threshold
        self.force = force
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.branches = 1           # transformer calls per step that must not share residuals (cond, uncond)
        self.calls = 0
        self._prev: list = []

    def reset(self) -> None:
        self.slots.clear()
        self.calls = 0

    def __enter__(self) -> "CacheState":
        if self.controller is None:
            raise ValueError("this CacheState is not bound to a model; use xdit_compile.cache_state(model)")
        self._prev.append(self.controller.current)
        self.controller.current = self
        return self

    def __exit__(self, *exc) -> None:
        self.controller.current = self._prev.pop()

    def summary(self) -> dict:
        """Transformer calls computed vs skipped (summed over cached graphs and CFG branches; usually one of
        each, so calls = steps), plus the statistic per call."""
        out = {"steps": 0, "computed": 0, "skipped": 0, "skipped_steps": [], "stat": []}
        for slot in self.slots.values():
            skipped = [bool(s) for s in slot.skipped]
            out["steps"] += len(skipped)
            out["skipped"] += sum(skipped)
            out["computed"] += len(skipped) - sum(skipped)
            out["skipped_steps"] += [i for i, s in enumerate(skipped) if s]
            out["stat"] += [float(s) for s in slot.stat]
        return out

    def format_summary(self) -> str:
        s = self.summary()
        method = self.controller.config.method if self.controller else "cache"
        thr = self.threshold if self.threshold is not None else (
            self.controller.config.threshold if self.controller else float("nan"))
        return (f"cache: {method} threshold {thr:g}: {s['computed']} of {s['steps']} steps computed, "
                f"{s['skipped']} skipped" + (f" (steps {s['skipped_steps']})" if s["skipped_steps"] else ""))


class CacheController:
    """Owned by one compiled model: its cache config, the cached graphs, the current request's state."""

    def __init__(self, config):
        self.config = config
        self.graphs: list[CacheGraphInfo] = []
        self.default = CacheState(self)
        self.current: CacheState = self.default
        self.last: CacheState | None = None
        self._modes: dict[torch.device, list[torch.Tensor]] = {}
        self._thresholds: dict[tuple, torch.Tensor] = {}

    def new_state(self, **kw) -> CacheState:
        return CacheState(self, **kw)

    def mode_tensor(self, mode: int, device) -> torch.Tensor:
        """Preallocated per device: no host-to-device copy per call."""
        device = torch.device(device)
        if device not in self._modes:
            self._modes[device] = [torch.tensor(m, dtype=torch.int32, device=device) for m in (0, 1, 2)]
        return self._modes[device][mode]

    def threshold_tensor(self, value: float | None, device) -> torch.Tensor:
        value = float(self.config.threshold if value is None else value)
        key = (torch.device(device), value)
        if key not in self._thresholds:
            self._thresholds[key] = torch.tensor(value, dtype=torch.float32, device=key[0])
        return self._thresholds[key]

    def wrap(self, fn, info: CacheGraphInfo) -> "CachedGraph":
        self.graphs.append(info)
        return CachedGraph(fn, info, self, len(self.graphs) - 1)


class CachedGraph:
    """The compiled graph plus the state plumbing: (args) -> graph(args, state..., mode) -> outputs."""

    def __init__(self, fn, info: CacheGraphInfo, controller: CacheController, index: int):
        self.fn, self.info, self.controller, self.index = fn, info, controller, index

    def _mode(self, state: CacheState, step: int) -> int:
        cfg = self.controller.config
        forced = state.force(step) if state.force is not None else None
        if forced is not None:
            if forced not in ("compute", "skip"):
                raise ValueError(f"cache force(step) must return 'compute', 'skip' or None, got {forced!r}")
            return COMPUTE if forced == "compute" else SKIP
        if step == 0 or step < cfg.warmup_steps:
            return COMPUTE
        if cfg.method == "teacache" and state.num_steps is not None and step >= state.num_steps - 1:
            return COMPUTE
        return DECIDE

    def __call__(self, *args):
        state = self.controller.current
        self.controller.last = state
        slot = state.slots.setdefault((self.index, state.calls % state.branches), _Slot())
        state.calls += 1
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        if slot.tensors is None:
            slot.tensors = [torch.full(s.shape, s.init, dtype=s.dtype, device=device) for s in self.info.state]
        mode = self.controller.mode_tensor(self._mode(state, slot.step), device)
        full = [*args, *slot.tensors, mode, self.controller.threshold_tensor(state.threshold, device)]
        outs = self.fn(*full)      # dynamo's convention (aot's wrapper copies a misleading _boxed_call)
        n, k = self.info.num_outputs, len(self.info.state)
        slot.tensors = list(outs[n:n + k])
        slot.skipped.append(outs[n + k])
        slot.stat.append(outs[n + k + 1])
        slot.step += 1
        head = outs[:n]
        return tuple(head) if isinstance(outs, tuple) else list(head)
