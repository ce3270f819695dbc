"""xdit::ulysses_attention / ring_attention / usp_attention against SDPA over the whole sequence.

Every rank builds the same full q/k/v/mask from a seed, passes its shard to the op and compares its rows with
``F.scaled_dot_product_attention`` on the full tensors (float32, 1e-5). One distributed call runs the whole
case grid for one op and world size, so the suite pays few round trips on a 2-core machine.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from xdit_compile.runtime import _lse
from xdit_compile.runtime.attention import _prepare_mask, comm_bytes

# name, Hq, Hkv, Dv, mask kind, extra op kwargs. D = 8, B = 2.
CASES = [
    ("plain", 4, 4, 8, None, {}),
    ("3_heads", 3, 3, 8, None, {}),
    ("gqa_4_2", 4, 2, 8, None, {"enable_gqa": True}),
    ("gqa_3_1", 3, 1, 8, None, {"enable_gqa": True}),
    ("gqa_pre_repeated", 4, 4, 8, None, {"repeat_kv_from": 2}),
    ("key_padding_bool", 4, 4, 8, "key_padding", {}),
    ("bias_per_head", 3, 3, 8, "bias_heads", {}),
    ("full_float_rows", 4, 4, 8, "full_rows", {}),
    ("full_float_unsharded", 4, 4, 8, "full", {}),
    ("full_bool_dead_row", 4, 4, 8, "full_bool", {}),
    ("scale", 4, 4, 8, "key_padding", {"scale": 0.3}),
    ("dv_ne_d", 4, 2, 6, "bias_heads", {"enable_gqa": True}),
    ("math_backend", 3, 3, 8, "key_padding", {"backend": "math"}),
]


def _full_inputs(case, total, seed=0):
    _, hq, hkv, dv, mask_kind, extra = case
    g = torch.Generator().manual_seed(seed)
    b, d = 2, 8
    q = torch.randn(b, hq, total, d, generator=g)
    src_heads = extra.get("repeat_kv_from", hkv)
    k = torch.randn(b, src_heads, total, d, generator=g)
    v = torch.randn(b, src_heads, total, dv, generator=g)
    if src_heads != hkv:
        k, v = k.repeat_interleave(hkv // src_heads, 1), v.repeat_interleave(hkv // src_heads, 1)
    mask = None
    if mask_kind == "key_padding":  # the last 3 keys are padding: a whole shard when sizes end in 1
        mask = torch.ones(b, 1, 1, total, dtype=torch.bool)
        mask[:, :, :, -3:] = False
        mask[1, :, :, 0] = False
    elif mask_kind == "bias_heads":
        mask = torch.randn(b, hq, 1, total, generator=g)
    elif mask_kind in ("full_rows", "full"):
        mask = torch.randn(b, 1, total, total, generator=g)
    elif mask_kind == "full_bool":
        mask = torch.rand(b, 1, total, total, generator=g) > 0.3
        mask[0, 0, 1, :] = False  # a query that sees no key: SDPA gives 0
    return q, k, v, mask


def _local_mask(mask, mask_kind, lo, hi):
    if mask is None or mask_kind in ("full", "full_bool"):
        return mask  # the unsharded mask; the op takes its own rows
    if mask_kind == "full_rows":
        return mask[:, :, lo:hi].contiguous()  # query rows sharded, keys whole
    return mask[..., lo:hi].contiguous()  # key dim sharded like k


def _groups(op, world_size, ulysses_size):
    """Group names for ``op``: (world) for ulysses/ring; (ulysses, ring) for USP, ring-major sp ranks."""
    import torch.distributed as dist

    if op != "usp_attention":
        return (dist.group.WORLD.group_name,)
    ring_size = world_size // ulysses_size
    rank = dist.get_rank()
    mine = {}
    for r in range(ring_size):  # every rank creates every group, in the same order
        g = dist.new_group([r * ulysses_size + u for u in range(ulysses_size)])
        if rank // ulysses_size == r:
            mine["ulysses"] = g
    for u in range(ulysses_size):
        g = dist.new_group([r * ulysses_size + u for r in range(ring_size)])
        if rank % ulysses_size == u:
            mine["ring"] = g
    return mine["ulysses"].group_name, mine["ring"].group_name


def _check_grid(rank, world_size, op, sizes, ulysses_size=1):
    """Run every case; return the failures (empty = all match)."""
    torch.manual_seed(0)
    groups = _groups(op, world_size, ulysses_size)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    failures = []
    for case in CASES:
        name, hq, hkv, dv, mask_kind, extra = case
        q, k, v, mask = _full_inputs(case, sum(sizes))
        scale = extra.get("scale")
        gqa = extra.get("enable_gqa", False)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)[:, :, lo:hi]
        args = (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], _local_mask(mask, mask_kind, lo, hi), scale, gqa)
        out = getattr(torch.ops.xdit, op)(*args, *groups, sizes, extra.get("backend", "auto"))
        if out.shape != ref.shape or not torch.allclose(out, ref, atol=1e-5, rtol=1e-5):
            err = (out - ref).abs().max().item() if out.shape == ref.shape else f"shape {tuple(out.shape)}"
            failures.append(f"rank {rank} {op} {sizes} {name}: {err}")
    return failures


def _assert_grid(op, world_size, sizes, ulysses_size=1):
    results = run_distributed(_check_grid, world_size, op, sizes, ulysses_size)
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sizes", [[4, 4], [5, 3]], ids=["even", "uneven"])
def test_ulysses_2(sizes):
    _assert_grid("ulysses_attention", 2, sizes)


def test_ulysses_4_uneven():
    _assert_grid("ulysses_attention", 4, [4, 3, 3, 1])


@pytest.mark.parametrize("sizes", [[4, 4], [5, 3]], ids=["even", "uneven"])
def test_ring_2(sizes):
    _assert_grid("ring_attention", 2, sizes)


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [4, 3, 3, 1]], ids=["even", "uneven"])
def test_ring_4(sizes):
    _assert_grid("ring_attention", 4, sizes)


def _check_ring_copy_engine(rank, world_size):
    """transfer "copy_engine" (runtime/ce_ring.py; here its gloo fallback, which fills the same rotated layout and runs
    the same own-block / peers' blocks attentions and merge) against SDPA, every unmasked case, twice (the second
    call reuses the receive buffer); and its refusals."""
    import torch.distributed as dist

    group = dist.group.WORLD.group_name
    sizes = [3] * world_size
    lo, hi = 3 * rank, 3 * (rank + 1)
    from xdit_compile.runtime import ce_ring

    failures = []
    cases = [c for c in CASES if c[4] is None] + [("dv_ne_d_plain", 4, 2, 6, None, {"enable_gqa": True})]
    # COPY_TOKENS sets how the peers' blocks are grouped into attention calls: at 4 ranks of 3 tokens, 3000 -> one
    # block per call, 2 -> one, then the other two together, 1 -> all three in one call
    seen = []
    for tokens in (3000, 2, 1):
        ce_ring.COPY_TOKENS = tokens
        seen.append(ce_ring._stages(world_size, 3))
        for case in cases:
            name, hq, hkv, dv, mask_kind, extra = case
            for call in range(2):
                q, k, v, _ = _full_inputs(case, sum(sizes), seed=call)
                gqa = extra.get("enable_gqa", False)
                ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)[:, :, lo:hi]
                out = torch.ops.xdit.ring_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], None, None, gqa,
                                                    group, sizes, "auto", "copy_engine")
                if out.shape != ref.shape or not torch.allclose(out, ref, atol=1e-5, rtol=1e-5):
                    err = (out - ref).abs().max().item() if out.shape == ref.shape else f"shape {tuple(out.shape)}"
                    failures.append(f"rank {rank} ring copy_engine {name} call {call} stages {seen[-1]}: {err}")
    if len({str(x) for x in seen}) != (3 if world_size == 4 else 1):
        failures.append(f"groupings tried: {seen}")
    ce_ring.COPY_TOKENS = 3000
    q = torch.randn(1, 2, 3, 8)
    for sizes_, mask in (([4] + [3] * (world_size - 1), None), (sizes, torch.ones(1, 1, 3, 3 * world_size) > 0)):
        if rank == 0 and sizes_ != sizes:
            q_ = torch.randn(1, 2, 4, 8)
        else:
            q_ = q
        try:
            torch.ops.xdit.ring_attention(q_, q_, q_, mask, None, False, group, sizes_, "auto", "copy_engine")
            failures.append(f"rank {rank}: sizes {sizes_} mask {mask is not None} was not refused")
        except ValueError as e:
            if "equal shards and no mask" not in str(e):
                failures.append(f"rank {rank}: unclear error {e}")
    return failures


def test_ring_copy_engine_stages():
    """Which peers' blocks each attention call takes after the own block (ce_ring._stages), in arrival order."""
    from xdit_compile.runtime.ce_ring import _stages

    assert _stages(2, 8448) == [[0]]                      # FLUX 2048² ring 2
    assert _stages(2, 10) == [[0]]
    assert _stages(4, 4224) == [[2], [1], [0]]            # FLUX 2048² ring 4: each block as it lands
    assert _stages(4, 8190) == [[2], [0, 1]]              # Wan 480p ring 4
    assert _stages(4, 20000) == [[0, 1, 2]]
    assert _stages(8, 1000) == [[6], [5], [4], [3], [2], [1], [0]]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_copy_engine_transfer(world_size):
    failures = [f for per_rank in run_distributed(_check_ring_copy_engine, world_size) for f in per_rank]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [4, 3, 3, 1]], ids=["even", "uneven"])
def test_usp_ring2_ulysses2(sizes):
    _assert_grid("usp_attention", 4, sizes, ulysses_size=2)


def _check_compiled(rank, world_size):
    import torch.distributed as dist

    import xdit_compile.runtime.attention  # noqa: F401 - registers torch.ops.xdit

    sizes = [5, 3]
    group = dist.group.WORLD.group_name
    case = ("compiled", 3, 3, 8, "key_padding", {})
    q, k, v, mask = _full_inputs(case, sum(sizes))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])

    def f(q, k, v, mask):
        out = torch.ops.xdit.ulysses_attention(q * 1.5, k, v, mask, None, False, group, sizes, "auto")
        return out.transpose(1, 2).flatten(2) + 1.0

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    args = (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], mask[..., lo:hi].contiguous())
    out = compiled(*args)
    ref = F.scaled_dot_product_attention(q * 1.5, k, v, attn_mask=mask)[:, :, lo:hi].transpose(1, 2).flatten(2) + 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return True


def test_compiled_ulysses_matches():
    assert run_distributed(_check_compiled, 2) == [True, True]


# --- single-process pieces ------------------------------------------------------------------------------


def test_attention_with_lse_merges_to_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    mask[:, :, :, :2] = False  # the first block is fully masked for every row
    mask[0, 0, 3] = False  # and this row sees nothing at all
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for backend in ("auto", "math"):
        o1, l1 = _lse.attention_with_lse(q, k[:, :, :2], v[:, :, :2], mask[..., :2], None, backend)
        o2, l2 = _lse.attention_with_lse(q, k[:, :, 2:], v[:, :, 2:], mask[..., 2:], None, backend)
        assert torch.isneginf(l1).all()
        out, lse = _lse.merge_lse(*_lse.merge_lse(None, None, o1, l1), o2, l2)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        full = torch.logsumexp((q @ k.transpose(-1, -2)) / math.sqrt(8) + _lse.as_additive_mask(mask, q.dtype), -1)
        torch.testing.assert_close(lse, full)


def test_merge_lse_all_matches_sdpa():
    """The one-pass K-way merge (ring attention's, after its last block) over 1..4 key blocks equals attention over
    all keys and the block-by-block merge; a block no row sees and a row that sees nothing stay NaN-free (0, -inf)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 6, 8, generator=g)
    k, v = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(2))
    mask = torch.rand(2, 1, 6, 8, generator=g) > 0.4
    mask[:, :, :, 2:4] = False  # the second block is fully masked for every row
    mask[1, 0, 4] = False       # and this row sees nothing at all
    full = torch.logsumexp((q @ k.transpose(-1, -2)) / math.sqrt(8) + _lse.as_additive_mask(mask, q.dtype), -1)
    for cuts in ([0, 8], [0, 2, 8], [0, 2, 4, 7, 8]):
        blocks = [_lse.attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], mask[..., a:b], None, "math")
                  for a, b in zip(cuts, cuts[1:])]
        out, lse = _lse.merge_lse_all([o for o, _ in blocks], [l_ for _, l_ in blocks], torch.float32)
        assert out.dtype == torch.float32 and not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
        assert (out[1, :, 4] == 0).all() and torch.isneginf(lse[1, :, 4]).all()
        fin = torch.isfinite(full)
        torch.testing.assert_close(lse[fin], full[fin])
        acc = None, None
        for o, l_ in blocks:
            acc = _lse.merge_lse(*acc, o, l_)
        torch.testing.assert_close(out, acc[0].float(), atol=1e-6, rtol=1e-6)
    half, _ = _lse.merge_lse_all([o.half() for o, _ in blocks], [l_ for _, l_ in blocks], torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="one lse per output"):
        _lse.merge_lse_all([blocks[0][0]], [], torch.float32)


@pytest.mark.parametrize("backend", ["nope", "flash_attn", "yunchang", "fa3_cute"])
def test_backend_errors_name_the_problem(backend):
    import importlib.util

    from xdit_compile.runtime import flash_cute

    if backend == "fa3_cute" and flash_cute.available():
        pytest.skip("fa3_cute runs here")
    if backend not in ("nope", "fa3_cute") and importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=backend):
        torch.ops.xdit.ring_attention(q, q, q, None, None, False, "unused", [4], backend)


def test_mask_sharded_on_both_dims_is_rejected():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="both query and key"):
        _prepare_mask(torch.zeros(1, 1, 3, 3), q, local=3, total=8)
    assert _prepare_mask(torch.zeros(1, 1, 3, 8), q, local=3, total=8).shape == (1, 1, 3, 8)
    assert _prepare_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), q, local=3, total=8).shape == (1, 1, 1, 3)


def test_comm_bytes():
    q_shape, k_shape = (1, 4, 4, 8), (1, 4, 4, 8)
    # Ulysses, 2 ranks x 4 tokens: send half of q, k, v (2 heads x 4 tokens x 8 each) and half of the output.
    assert comm_bytes("ulysses_attention", q_shape, k_shape, 4, [4, 4], 2) == [4 * (3 * 2 * 4 * 8 + 2 * 4 * 8)] * 2
    # Ring, 4 ranks, uneven: 3 sends of k+v padded to the longest shard (3 tokens).
    assert comm_bytes("ring_attention", q_shape, k_shape, 2, [3, 2, 2, 1], 4) == [2 * 3 * 4 * 3 * 16] * 4
    # GQA rotates the unrepeated k/v heads.
    assert comm_bytes("xdit::ring_attention", q_shape, (1, 2, 4, 8), 2, [4, 4], 2, enable_gqa=True) == [2 * 2 * 4 * 16] * 2
    usp = comm_bytes("usp_attention", q_shape, k_shape, 4, [2, 2, 2, 2], 2, ring_size=2)
    assert usp == [4 * (3 * 2 * 2 * 8 + 2 * 2 * 8) + 4 * (2 * 4 * 16)] * 4


@pytest.mark.parametrize("bshd", [True, False])
def test_fa3_attention_op_keeps_q_layout(bshd):
    """xdit.fa3_attention (what the attention_kernel pass emits) returns its output in q's layout, as SDPA's
    kernels do: a (B, S, H, D) buffer seen as (B, H, S, D) when q is such a view (diffusers' attention), else
    contiguous; its fake promises the same strides, so Inductor's compiled code runs it (off sm90: SDPA)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))            # (B, S, H, D)
    if bshd:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))             # (B, H, S, D) views
    else:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = torch.ops.xdit.fa3_attention(q, k, v, 0.5)
    assert out.stride() == ((15 * 8, 8, 3 * 8, 1) if bshd else (15 * 8, 5 * 8, 8, 1))
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)

    def f(q, k, v):
        return torch.ops.xdit.fa3_attention(q, k, v, 0.5).transpose(1, 2).flatten(2) * 2

    torch._dynamo.reset()
    got = torch.compile(f, backend="inductor")(q, k, v)
    torch.testing.assert_close(got, ref.transpose(1, 2).flatten(2) * 2)


def _fa3_runs():
    from xdit_compile.runtime import flash_cute
    return flash_cute.available()


@pytest.mark.skipif(not _fa3_runs(), reason="flash_attn.cute's kernel needs a Hopper GPU and its packages")
@pytest.mark.parametrize("layout,config", [("bshd", None), ("bhsd", None), ("packed", None),
                                           ("bhsd", (128, 128, 3, 384, False))])
def test_fa3_cute_kernel_on_hopper(layout, config):
    """The kernel against float32 math: out within bf16 rounding (as close as cuDNN), LSE to float32 precision,
    for the layouts q arrives in (diffusers' (B, S, H, D) views, contiguous (B, H, S, D), and views of one
    (B, S, 3, H, D) buffer, what decompose_ulysses' all-to-all delivers) and another tiling than CONFIG
    (benchmarks/attn_kernels.py and fa_cute_tiles.py time them)."""
    from xdit_compile.runtime import flash_cute

    torch.manual_seed(0)
    if layout == "packed":
        qkv = torch.randn(1, 300, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv.select(2, i).transpose(1, 2) for i in range(3))
    else:
        shape = (1, 300, 4, 128) if layout == "bshd" else (1, 4, 300, 128)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = flash_cute.attention(q, k, v, None, with_lse=True, config=config)
    ref, ref_lse = _lse._math(q.float(), k.float(), v.float(), None, None)
    cudnn = F.scaled_dot_product_attention(q, k, v)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2 and err <= 1.5 * (cudnn.float() - ref).norm() / ref.norm(), err
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
