"""The Triton kernels (runtime/norm_rope.py's norm_rope, runtime/_lse.py's LSE merge) on CPU, under Triton's
interpreter (TRITON_INTERPRET=1), against their torch paths.

The CPU torch build has no Triton: install it beside the project, where only these subprocesses see it:
    pip install --no-deps --target .triton triton==3.6.0
(the README's test command does). Without it the test is skipped; on a GPU machine
tests/test_passes.py::test_norm_rope_kernel_on_cuda runs the real kernel. The interpreter truncates float -> bf16
casts where the GPU rounds, so bf16 results are compared to within one bf16 step, float32 ones tightly.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.environ.get("XDIT_TRITON_SITE", os.path.join(ROOT, ".triton"))


def _triton_path() -> str | None:
    if os.path.isdir(os.path.join(SITE, "triton")):
        return SITE
    spec = importlib.util.find_spec("triton")
    return os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None


def _interpret(code: str) -> str:
    site = _triton_path()
    if site is None:
        pytest.skip("triton is not installed: pip install --no-deps --target .triton triton==3.6.0")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([site, ROOT]))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_lse_merge_kernel_interpreted():
    out = _interpret("""
        import torch
        from xdit_compile.runtime import _lse
        assert _lse.triton is not None
        torch.manual_seed(0)

        def ref(a, la, b, lb, dtype):   # merge_lse's torch path
            lse = torch.logaddexp(la, lb)
            r = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
            o = a.float() * torch.exp(la - r).unsqueeze(-1) + b.float() * torch.exp(lb - r).unsqueeze(-1)
            return o.to(dtype), lse

        for B, H, S, D in [(1, 3, 37, 128), (2, 2, 5, 72)]:
            a = torch.randn(B, S, H, D).transpose(1, 2)            # (B, H, S, D) views of BSHD memory, as
            b = torch.randn(B, S, H, D, dtype=torch.bfloat16).transpose(1, 2)   # SDPA returns them
            la, lb = torch.randn(B, H, S, 1)[..., 0] * 3, torch.randn(B, H, S) * 3
            la[0, 0, :3] = float("-inf")
            lb[0, 0, 1:4] = float("-inf")                          # row 1 and 2: no key on either side
            for dtype in (torch.float32, torch.bfloat16):
                o, l = _lse._merge_triton(a, la, b, lb, dtype, False)
                ro, rl = ref(a, la, b, lb, dtype)
                assert o.dtype == dtype and l.dtype == torch.float32 and o.is_contiguous()
                assert not o.isnan().any() and not l.isnan().any()
                assert torch.equal(torch.isneginf(l), torch.isneginf(rl))
                fin = torch.isfinite(rl)
                assert (l[fin] - rl[fin]).abs().max() < 1e-5
                tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ro.float().abs() + 1e-6
                assert ((o.float() - ro.float()).abs() <= tol).all(), (B, H, S, D, dtype)
                assert (o[0, 0, 1:3] == 0).all()
            acc, lacc = a.contiguous() * 1.0, la.contiguous().clone()  # owned buffers: merged in place
            ro, rl = ref(acc, lacc, b, lb, torch.float32)
            o, l = _lse._merge_triton(acc, lacc, b, lb, torch.float32, True)
            assert o.data_ptr() == acc.data_ptr() and l.data_ptr() == lacc.data_ptr()
            assert (o - ro).abs().max() < 1e-5
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_lse_merge_all_kernel_interpreted():
    """merge_lse_all's K-way kernel (ring attention's one merge after its last block) against its torch path, for
    K = 1..4 and 8, partials in (B, S, H, D) memory as SDPA returns them, rows where some or every block is -inf."""
    out = _interpret("""
        import torch
        from xdit_compile.runtime import _lse
        assert _lse.triton is not None
        torch.manual_seed(0)
        for B, H, S, D in [(1, 3, 37, 128), (2, 2, 5, 72)]:
            for K in (1, 2, 3, 4, 8):
                outs = [torch.randn(B, S, H, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(K)]
                lses = [torch.randn(B, H, S) * 3 for _ in range(K)]
                lses[0][0, 0, :3] = float("-inf")
                for l in lses:
                    l[0, 0, 1] = float("-inf")                   # row 1: no key in any block
                for dtype in (torch.float32, torch.bfloat16):
                    o, l = _lse._merge_all_triton(outs, lses, dtype)
                    ro, rl = _lse.merge_lse_all(outs, [x.clone() for x in lses], dtype)  # CPU: the torch path
                    assert o.dtype == dtype and l.dtype == torch.float32 and o.is_contiguous()
                    assert not o.isnan().any() and not l.isnan().any()
                    assert torch.equal(torch.isneginf(l), torch.isneginf(rl))
                    fin = torch.isfinite(rl)
                    assert (l[fin] - rl[fin]).abs().max() < 1e-5, (K, dtype)
                    tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ro.float().abs() + 1e-6
                    assert ((o.float() - ro.float()).abs() <= tol).all(), (B, H, S, D, K, dtype)
                    assert (o[0, 0, 1] == 0).all()
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_norm_rope_kernel_interpreted():
    out = _interpret("""
        import torch
        from xdit_compile.runtime.norm_rope import _reference, _triton, triton
        assert triton is not None
        torch.manual_seed(0)

        def close(out, ref):
            assert out.shape == ref.shape and out.dtype == ref.dtype
            if out.dtype == torch.float32:
                assert (out - ref).abs().max() < 1e-4
            else:      # the interpreter truncates to bf16 twice (norm, rotation): a bf16 step or two of the scale
                err = (out.float() - ref.float()).abs()
                print(dt, "max err", err.max().item(), "rel", (err.norm() / ref.float().norm()).item())
                assert err.max() <= 2 ** -6 * ref.float().abs().max() and err.norm() <= 1e-2 * ref.float().norm()

        for dt in (torch.float32, torch.bfloat16):
            # FLUX's double block: text then image, the text strided (a slice of a wider projection)
            a = torch.randn(2, 7, 3 * 3 * 16, dtype=dt)[..., :3 * 16].unflatten(-1, (3, 16))
            b = torch.randn(2, 9, 3, 16, dtype=dt)
            wa, wb = torch.randn(16, dtype=dt), torch.randn(16, dtype=dt)
            cos, sin = torch.randn(16, 16), torch.randn(16, 16)
            fr = (cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2])
            for rf in (False, True):
                close(_triton([a, b], [wa, wb], 1e-6, False, fr, rf), _reference([a, b], [wa, wb], 1e-6, False, fr, rf))
            # Wan: the whole token normalised, an odd head count, cos / sin per batch and token
            x, w = torch.randn(1, 5, 5 * 16, dtype=dt).unflatten(2, (5, -1)), torch.randn(80, dtype=dt)
            fc, fs = torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16)
            fr = (fc[..., 0::2], fs[..., 1::2], fc[..., 0::2], fs[..., 1::2])
            close(_triton([x], [w], 1e-6, True, fr, False), _reference([x], [w], 1e-6, True, fr))
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_local_copy_kernel_interpreted():
    """local_copy.copy2d (the copy-engine all-to-all's own piece, XDIT_CE_LOCAL=triton): rows x width elements
    between row pitches, at offsets, exactly as the same slices copied by torch; nothing outside them written."""
    out = _interpret("""
        import torch
        from xdit_compile.runtime.local_copy import copy2d, triton
        assert triton is not None
        torch.manual_seed(0)
        # (rows, width, spitch, dpitch, src_off, dst_off): ulysses-2/-4 q/k/v and o shapes (small), widths that are
        # not a power of two, one wider than a block (1024)
        for rows, width, sp, dp, so, do in [(37, 96, 192, 96, 96, 37 * 96), (5, 1536, 3072, 1536, 0, 0),
                                            (9, 72, 72 * 3, 72 * 4, 144, 72 * 2), (3, 2050, 4100, 2050, 2050, 7)]:
            for dtype in (torch.bfloat16, torch.float32):
                src = torch.randn(so + rows * sp + 3).to(dtype)
                dst = torch.full((do + rows * dp + 5,), -7.0, dtype=dtype)
                want = dst.clone()
                want[do:do + rows * dp].view(rows, dp)[:, :width] = src[so:so + rows * sp].view(rows, sp)[:, :width]
                copy2d(dst, do, dp, src, so, sp, width, rows)
                assert torch.equal(dst, want), (rows, width, sp, dp, so, do, dtype)
        print("ok")
    """)
    assert out.strip().endswith("ok")
