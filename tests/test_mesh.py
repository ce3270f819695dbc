"""ParallelDims: process-group setup, the world-size check on every rank, and the axis groups."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from dist_utils import run_distributed

from xdit_compile import mesh
from xdit_compile.plan import ParallelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _axes(rank, world_size, degrees):
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    from xdit_compile.mesh import ParallelDims

    dims = ParallelDims.from_plan(ParallelConfig(**degrees))
    assert ParallelDims.from_plan(ParallelConfig(**degrees)) is dims  # cached per degrees
    out = {"rank": dims.rank, "world_size": dims.world_size, "device": str(dims.device)}
    for axis in (*ParallelConfig.AXES, "sp"):
        group = dims.get_group(axis)
        assert _resolve_process_group(dims.group_name(axis)) is group
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=group)  # the group really communicates, and with the ranks it lists
        out[axis] = {
            "ranks": dims.axis_ranks(axis),
            "size": dims.axis_size(axis),
            "rank": dims.axis_rank(axis),
            "sum": total.item(),
        }
    assert dims.sp_group is dims.get_group("sp")
    out["enabled"] = (dims.ulysses_enabled, dims.ring_enabled, dims.sp_enabled)
    return out


def test_ring2_ulysses2_groups():
    results = run_distributed(_axes, 4, {"ring": 2, "ulysses": 2})
    for rank, r in enumerate(results):
        assert (r["rank"], r["world_size"], r["device"]) == (rank, 4, "cpu")
        assert r["ulysses"]["ranks"] == ([0, 1] if rank < 2 else [2, 3])  # innermost: consecutive ranks
        assert r["ring"]["ranks"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert r["sp"]["ranks"] == [0, 1, 2, 3]
        assert r["ulysses"]["rank"] == rank % 2 and r["ring"]["rank"] == rank // 2
        assert r["sp"]["rank"] == r["ring"]["rank"] * 2 + r["ulysses"]["rank"]  # ring-major
        for axis in ("ulysses", "ring", "sp"):
            assert r[axis]["sum"] == sum(r[axis]["ranks"])
        for axis in ("data", "cfg", "pipefusion"):
            assert r[axis]["ranks"] == [rank] and r[axis]["size"] == 1 and r[axis]["rank"] == 0
        assert r["enabled"] == (True, True, True)


def test_data2_ulysses2_groups():
    results = run_distributed(_axes, 4, {"data": 2, "ulysses": 2})
    for rank, r in enumerate(results):
        assert r["data"]["ranks"] == ([0, 2] if rank % 2 == 0 else [1, 3])  # data is outermost
        assert r["ulysses"]["ranks"] == ([0, 1] if rank < 2 else [2, 3])
        assert r["sp"]["ranks"] == r["ulysses"]["ranks"] and r["ring"]["size"] == 1
        assert r["enabled"] == (True, False, True)


def _world_size_error(rank, world_size, degrees):
    from xdit_compile.mesh import ParallelDims

    try:
        ParallelDims.from_plan(ParallelConfig(**degrees))
    except ValueError as e:
        return str(e)
    return None


def test_world_size_mismatch_raises_on_every_rank():
    messages = run_distributed(_world_size_error, 2, {"ulysses": 4}, timeout=60)
    assert len(messages) == 2 and messages[0] == messages[1]
    assert "ulysses=4 = 4 but the world size is 2" in messages[0]
    assert "change the degrees so their product is 2" in messages[0]
    # the pool (and its process group) is still usable afterwards
    assert run_distributed(_axes, 2, {"ring": 2})[1]["ring"]["ranks"] == [0, 1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SINGLE = textwrap.dedent(
    """
    from xdit_compile.mesh import ParallelDims
    from xdit_compile.plan import ParallelConfig
    dims = ParallelDims.from_plan(ParallelConfig())
    assert (dims.world_size, dims.rank, dims.sp_enabled, dims.axis_size("sp")) == (1, 0, False, 1), dims
    dims.group_name("ulysses")
    try:
        ParallelDims.from_plan(ParallelConfig(ring=2))
    except ValueError as e:
        assert "the world size is 1" in str(e), e
    else:
        raise AssertionError("no error for ring=2 in one process")
    print("OK")
    """
)


def test_single_process_plain_and_torchrun_env():
    """A plain `python script.py` and a one-process torchrun both get a usable one-rank mesh."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    torchrun = dict(base, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(_free_port()))
    procs = [
        subprocess.Popen([sys.executable, "-c", SINGLE], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for env in (base, torchrun)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip().endswith("OK"), out


def test_timeout_env(monkeypatch):
    monkeypatch.delenv("XDIT_TIMEOUT_S", raising=False)
    assert mesh._timeout().total_seconds() == 300
    monkeypatch.setenv("XDIT_TIMEOUT_S", "12.5")
    assert mesh._timeout().total_seconds() == 12.5
    monkeypatch.setenv("XDIT_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="XDIT_TIMEOUT_S must be a number of seconds > 0, got 'soon'"):
        mesh._timeout()


def test_unknown_axis():
    dims = object.__new__(mesh.ParallelDims)  # the axis check needs no process group
    with pytest.raises(ValueError, match="unknown mesh axis 'tp'; valid axes: data, cfg, pipefusion, ring, ulysses, sp"):
        dims.get_group("tp")
