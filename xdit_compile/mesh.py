"""ParallelDims: the one object that owns the parallel degrees and their process groups.

Mesh axes, outermost first: ``data, cfg, pipefusion, ring, ulysses``. Ulysses is innermost, so a Ulysses
group is consecutive ranks (on one node, where its all-to-alls are cheapest). ``sp`` is the flattened
``ring x ulysses`` axis, ring-major: ``sp rank = ring_rank * ulysses + ulysses_rank``.

Only this module and ``runtime/`` talk to ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .plan.schema import ParallelConfig

__all__ = ["ParallelDims", "SP_AXIS"]

SP_AXIS = "sp"
"""The flattened ring x ulysses axis name, accepted wherever an axis name is."""
REPLICA_AXIS = "replica"
"""The flattened cfg x ring x ulysses axis (cfg-major): the ranks that together compute one model call."""

_DEFAULT_TIMEOUT_S = 300.0

# Keyed by (degrees, default process group): a new default group (tests that re-init) gets new dims.
_CACHE: dict[tuple[tuple[int, ...], int], ParallelDims] = {}


class ParallelDims:
    """Degrees -> named DeviceMesh axes. Build it with ``ParallelDims.from_plan(plan.parallel)``."""

    def __init__(self, *, parallel: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> None:
        self.parallel = parallel
        """The degrees this mesh was built from."""
        self.mesh = mesh
        """The 5-d DeviceMesh (dims named as ``ParallelConfig.AXES``), for DTensor users."""
        self.device = device
        """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self._sp_mesh = mesh[("ring", "ulysses")]._flatten(SP_AXIS)
        # cfg x ring x ulysses, cfg-major: gathers of a dim that holds both batch and token shards.
        self._replica_mesh = mesh[("cfg", "ring", "ulysses")]._flatten(REPLICA_AXIS)

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_plan(cls, parallel: ParallelConfig) -> ParallelDims:
        """Initialise torch.distributed if needed, check the degrees against the world size, build groups.

        Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the default group comes from the environment; in a
        plain single-process call it is a one-rank group, so every axis exists with size 1. The backend is
        nccl when CUDA is available, else gloo; ``XDIT_TIMEOUT_S`` overrides the 300 s collective timeout.
        Raises the same ``ValueError`` on every rank when the product of the degrees is not the world size.
        """
        if not isinstance(parallel, ParallelConfig):
            raise TypeError(f"ParallelDims.from_plan takes a ParallelConfig, got {type(parallel).__name__}")
        device = _local_device()
        _ensure_initialized(device)
        # Deterministic on every rank (same degrees, same world size): no rank waits for another to fail.
        parallel.check_world_size(dist.get_world_size())
        key = (parallel.degrees(), id(dist.distributed_c10d._get_default_group()))
        dims = _CACHE.get(key)
        if dims is None:
            mesh = init_device_mesh(device.type, parallel.degrees(), mesh_dim_names=ParallelConfig.AXES)
            dims = _CACHE[key] = cls(parallel=parallel, mesh=mesh, device=device)
            dims._connect()
        return dims

    def _connect(self) -> None:
        """One barrier on every group of more than one rank, in one order on every rank, so NCCL makes its
        communicators here and not lazily on their first collective inside a compiled graph's first run. There a
        communicator's creation (a host-side collective) could meet a rank blocked on its own GPU (Inductor's
        per-rank autotuning synchronizes): the deadlock found with copy_engine's lazily made buffers on Wan."""
        if dist.get_world_size() == 1:
            return
        for axis in (*ParallelConfig.AXES, SP_AXIS):
            if self.axis_size(axis) > 1:
                g = self.get_group(axis)
                if self.device.type == "cuda":
                    dist.barrier(group=g, device_ids=[self.device.index])
                else:
                    dist.barrier(group=g)

    # --- axes -----------------------------------------------------------------------------------------

    def _axis_mesh(self, axis: str) -> DeviceMesh:
        if axis == SP_AXIS:
            return self._sp_mesh
        if axis == REPLICA_AXIS:
            return self._replica_mesh
        if axis not in ParallelConfig.AXES:
            valid = ", ".join((*ParallelConfig.AXES, SP_AXIS))
            raise ValueError(f"unknown mesh axis {axis!r}; valid axes: {valid}")
        return self.mesh[axis]

    def get_group(self, axis: str) -> dist.ProcessGroup:
        """The process group of this rank along ``axis`` (one of ``ParallelConfig.AXES`` or ``"sp"``)."""
        return self._axis_mesh(axis).get_group()

    def group_name(self, axis: str) -> str:
        """The group's registered name; custom ops resolve it with ``_resolve_process_group``."""
        return self.get_group(axis).group_name

    def axis_size(self, axis: str) -> int:
        """The degree along ``axis``."""
        return self._axis_mesh(axis).size()

    def axis_rank(self, axis: str) -> int:
        """This rank's coordinate along ``axis`` (0 .. axis_size - 1)."""
        return self._axis_mesh(axis).get_local_rank()

    def axis_ranks(self, axis: str) -> list[int]:
        """The global ranks in this rank's ``axis`` group, in axis order."""
        return dist.get_process_group_ranks(self.get_group(axis))

    def new_axis_group(self, axis: str) -> dist.ProcessGroup:
        """A second process group along ``axis`` (same ranks as ``get_group(axis)``, its own communicator),
        so two streams of messages between the same ranks do not queue behind each other. A collective over
        the world: every rank must call it, in the same order."""
        if axis not in ParallelConfig.AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; valid axes: {', '.join(ParallelConfig.AXES)}")
        ranks = self.mesh.mesh
        d = ParallelConfig.AXES.index(axis)
        groups = ranks.movedim(d, -1).reshape(-1, ranks.shape[d]).tolist()
        mine, _ = dist.new_subgroups_by_enumeration(groups, timeout=_timeout())
        return mine

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """The flattened ring x ulysses group (ring-major)."""
        return self.get_group(SP_AXIS)

    @property
    def ulysses_enabled(self) -> bool:
        return self.parallel.ulysses > 1

    @property
    def ring_enabled(self) -> bool:
        return self.parallel.ring > 1

    @property
    def sp_enabled(self) -> bool:
        """True when the sequence is sharded at all (ulysses or ring > 1)."""
        return self.parallel.sequence > 1

    def __repr__(self) -> str:
        degrees = ", ".join(f"{a}={d}" for a, d in zip(ParallelConfig.AXES, self.parallel.degrees()))
        return f"ParallelDims({degrees}, rank={self.rank}/{self.world_size}, device={self.device})"


# --- process-group setup ------------------------------------------------------------------------------


def _local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("XDIT_TIMEOUT_S")
    if raw is None:
        return datetime.timedelta(seconds=_DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"XDIT_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def _ensure_initialized(device: torch.device) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or a launcher that mimics it)
        dist.init_process_group(backend, init_method="env://", timeout=_timeout())
    else:
        # A plain `python script.py`: a one-rank group on an in-memory store (no port, no network), so
        # every axis and group exists with size 1 and the same code path runs as under torchrun.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=_timeout())
