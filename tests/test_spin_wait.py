"""runtime/spin_wait.py: the kernel that XDIT_CE_SIGNAL=spin runs at a copy-engine wait (GPU only: Triton's
interpreter has no global timer). One GPU stands in for the peers: a side stream sets the flags with the same
stream memory operation the senders use, after a delay."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the spin-wait kernel runs on a GPU")


@gpu
def test_spin_wait_waits_for_every_peer_flag_and_resets_them():
    from xdit_compile.runtime import ce_a2a
    from xdit_compile.runtime.spin_wait import spin_wait

    n, me = 4, 1
    flags = torch.zeros(2 * n, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    out = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)                       # ~25 ms: the peers' copies still moving
        for p in range(n):
            if p != me:                                     # chunk 1's flags: [n, 2n)
                ce_a2a._check_cu(ce_a2a._cuda()["write32"](side.cuda_stream, flags.data_ptr() + (n + p) * 4, 1, 0),
                                 "cuStreamWriteValue32")
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    spin_wait(flags, n, 2 * n, n, me, 60_000)
    out.fill_(1.0)                                          # what reads the data comes after the wait
    t1.record()
    torch.cuda.synchronize()
    assert t0.elapsed_time(t1) > 5.0, t0.elapsed_time(t1)   # it waited for the side stream's flags
    assert flags.tolist() == [0] * (2 * n) and out.item() == 1.0
    spin_wait(flags, 0, 0, n, me, 1000)                    # nothing to wait for: returns
    torch.cuda.synchronize()


@gpu
def test_spin_wait_times_out_instead_of_hanging():
    code = textwrap.dedent("""
        import torch
        from xdit_compile.runtime.spin_wait import spin_wait
        f = torch.zeros(4, dtype=torch.int32, device="cuda")
        spin_wait(f, 0, 4, 4, 0, 200)       # no peer ever sets them; 200 ms
        torch.cuda.synchronize()
        print("returned")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])))
    assert r.returncode != 0 and "returned" not in r.stdout, r.stdout + r.stderr[-2000:]


def test_spin_mode_is_a_known_signal():
    """XDIT_CE_SIGNAL=spin is accepted (the CPU fallback ignores it); an unknown mode names the three."""
    from xdit_compile.runtime import ce_a2a

    old = os.environ.get("XDIT_CE_SIGNAL")
    try:
        os.environ["XDIT_CE_SIGNAL"] = "spin"
        assert ce_a2a._signal_mode() == "spin"
        os.environ["XDIT_CE_SIGNAL"] = "spinning"
        with pytest.raises(ValueError, match="'spin'"):
            ce_a2a._signal_mode()
    finally:
        os.environ.pop("XDIT_CE_SIGNAL") if old is None else os.environ.__setitem__("XDIT_CE_SIGNAL", old)
