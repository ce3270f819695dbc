"""Unit tests of the analysis and the passes on small traced graphs (counted rewrites + numeric checks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dist_utils import run_distributed
from models import MODELS

from xdit_compile.passes import token_dims as td
from xdit_compile.passes.shard_sequence import choose_units, even_layout


def _capture(model, inputs):
    gms = []

    def backend(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(**inputs)
    return gms


def _sizes(an, units):
    return sorted(an.classes.size[u] for u in units)


def test_flux_joint_sequence_is_text_plus_image():
    case = MODELS["flux"]
    (gm,) = _capture(case.build(), case.inputs())
    an = td.analyze(gm)
    units, seq = choose_units(an)
    assert _sizes(an, units) == [7, 24]            # text and image segments, sharded separately
    assert an.classes.kind[seq] == "cat"
    for n in an.attention:                           # every joint attention uses that sequence class
        q = td.arg(n, 0, "query")
        assert an.classes.find(an.dims[q][-2]) == seq


def test_pixart_cross_attention_keys_are_not_sharded():
    case = MODELS["pixart"]
    (gm,) = _capture(case.build(), case.inputs())
    an = td.analyze(gm)
    units, _ = choose_units(an)
    assert _sizes(an, units) == [24]
    kinds = []
    for n in an.attention:
        k = td.arg(n, 1, "key")
        kinds.append(an.classes.contains(an.dims[k][-2], units))
    assert sorted(kinds) == [False, True]            # self-attention sharded, text keys whole


def test_latte_temporal_attention_carries_tokens_in_batch():
    case = MODELS["latte"]
    (gm,) = _capture(case.build(), case.inputs())
    an = td.analyze(gm)
    units, _ = choose_units(an)
    in_batch = 0
    for n in an.attention:
        q = td.arg(n, 0, "query")
        d = an.dims[q]
        if not an.classes.contains(d[-2], units) and an.classes.contains(d[0], units):
            in_batch += 1
    assert in_batch == 1


def test_even_layout_uneven_lengths():
    assert even_layout(7, 2) == [(0, 4), (4, 3)]
    assert even_layout(3, 4) == [(0, 1), (1, 1), (2, 1), (3, 0)]


def test_no_passes_when_sequence_parallel_is_off():
    from xdit_compile.passes.manager import build_pipeline

    class Ctx:
        sp_size = 1
        cfg_split = False
        disabled_passes = frozenset()

    assert build_pipeline(Ctx()) == []


class Toy(nn.Module):
    """linear -> attention over tokens -> unpatchify (a reshape of tokens into h x w: a sink)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)

    def forward(self, x):                      # x: (B, 6*5, 8)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(o).reshape(x.shape[0], 6, 5, 8).permute(0, 3, 1, 2)


def _toy(rank, world, disable):
    import xdit_compile
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, x = Toy(), torch.randn(2, 30, 8)
    ref = m(x)
    xdit_compile.parallelize(m, {"parallel": {"ulysses": 2}}, disable_passes=disable)
    out = m(x)
    rep = m._xdit_compiler.reports[0]
    kinds = [e["kind"] for e in rep["events"]]
    return ((out - ref).abs().max().item(), [a["became"] for a in rep["attention"]], kinds,
            str(rep["graph"].code))


def test_toy_rewrite_counts_and_numerics():
    res = run_distributed(_toy, 2, ())
    for err, became, kinds, code in res:
        assert err < 1e-5
        assert became == ["ulysses x2"]
        assert kinds.count("shard") == 1         # x sliced once, at the source
        assert kinds.count("gather") == 1        # before the unpatchify reshape
        assert "ulysses_attention" in code and "scaled_dot_product_attention" not in code


def test_disabling_all_passes_leaves_the_graph_alone():
    res = run_distributed(_toy, 2, ("find_attention", "shard_sequence", "rewrite_attention"))
    for err, became, kinds, code in res:
        assert err < 1e-6 and became == [] and kinds == []
        assert "scaled_dot_product_attention" in code


def test_mochi_spec_undone():
    """parallelize() gives Mochi a masked-attention processor (models_registry/specs.py); unparallelize() gives
    the original back, and the model computes what it computed before."""
    from xdit_compile.models_registry.specs import apply_spec, undo_spec

    case = MODELS["mochi"]
    model = case.build()
    kw = case.inputs()
    before = {n: m.processor for n, m in model.named_modules() if type(m).__name__ == "MochiAttention"}
    assert before
    with torch.no_grad():
        ref = model(**kw)[0]
    assert apply_spec(model)
    assert all(type(m.processor).__name__ == "MaskedMochiAttnProcessor" for n, m in model.named_modules() if n in before)
    undo_spec(model)
    assert {n: m.processor for n, m in model.named_modules() if n in before} == before
    assert not any(hasattr(m, "_xdit_orig_processor") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], ref)


class _Mlps(nn.Module):
    """Three linear + GELU pairs: tanh (fused), exact erf (left alone), tanh on a linear read twice (left alone)."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
        self.w3, self.b3 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))

    def forward(self, x):
        a = F.gelu(F.linear(x, self.w1, self.b1), approximate="tanh")
        b = F.gelu(F.linear(x, self.w2, self.b2))
        y = F.linear(x, self.w3, self.b3)
        return a + b + F.gelu(y, approximate="tanh") + y


def test_fuse_gelu_pass_matches_only_tanh_pairs():
    import torch.fx as fx

    from xdit_compile.passes.fuse_gelu import fuse_gelu_pass
    from xdit_compile.runtime.fused_linear import linear_gelu_tanh

    m = _Mlps()
    gm = fx.symbolic_trace(m)
    x = torch.randn(2, 5, 8)
    ref = m(x)

    class Ctx:
        fuse_report: dict = {}

    ctx = Ctx()
    assert fuse_gelu_pass(gm, ctx) and ctx.fuse_report == {"gelu": 1}
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(linear_gelu_tanh) == 1 and targets.count(torch._C._nn.gelu) == 2, targets
    torch.testing.assert_close(gm(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt epilogue path needs a GPU")
def test_linear_gelu_tanh_on_cuda():
    """On CUDA in bf16 the fused call (one cuBLASLt GEMM with a bias + GELU epilogue) is closer to float32 than
    the unfused bf16 pair, and has the output shape of the pair."""
    from xdit_compile.runtime.fused_linear import linear_gelu_tanh

    torch.manual_seed(0)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) / 16
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    fused, pair = linear_gelu_tanh(x, w, b), F.gelu(F.linear(x, w, b), approximate="tanh")
    assert fused.shape == pair.shape == (2, 300, 1024)
    err = [((t.float() - ref).norm() / ref.norm()).item() for t in (fused, pair)]
    assert err[0] < 4e-3 and err[0] <= err[1] * 1.1, err


def _capture_with_inputs(model, inputs):
    got = []

    def backend(gm, example_inputs):
        got.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    return got


@pytest.mark.parametrize("name,fused", [("flux", 4), ("wan", 2), ("hunyuanvideo", 2), ("cogvideox", 0)])
def test_fuse_norm_rope_pass_counts_and_numerics(name, fused):
    """FLUX (per-head norm, diffusers' apply_rotary_emb; the double block's text + image cat), Wan (whole-token
    norm, its own rotary) and HunyuanVideo's dual-stream block (diffusers' own RMSNorm; its single-stream block
    rotates a slice of q and is left alone) are fused, q and k of each; models with another norm or rotary form
    (CogVideoX: LayerNorm) are left alone. The fused graph computes the same (the op's torch path off CUDA)."""
    from xdit_compile.passes.fuse_norm_rope import fuse_norm_rope_pass

    case = MODELS[name]
    count = 0
    for gm, ex in _capture_with_inputs(case.build(), case.inputs()):
        with torch.no_grad():
            ref = gm(*ex)

        class Ctx:
            fuse_report: dict = {}

        ctx = Ctx()
        if fuse_norm_rope_pass(gm, ctx):
            gm.graph.lint()
            gm.recompile()
        count += ctx.fuse_report["norm_rope"]
        code = gm.code
        with torch.no_grad():
            out = gm(*ex)
        for a, b in zip(ref, out):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert count == fused
    if fused:
        assert "norm_rope" in code
    if name == "flux":        # every norm of q / k (text and image) went into a fused call
        assert "rms_norm" not in code


def test_norm_rope_reference_matches_diffusers_bf16():
    """The op's torch path in bf16 against diffusers' own code: FLUX's form with a text + image cat, Wan's form."""
    from diffusers.models.embeddings import apply_rotary_emb

    from xdit_compile.runtime.norm_rope import norm_rope

    torch.manual_seed(0)
    bf = torch.bfloat16
    a = torch.randn(2, 5, 96, dtype=bf)[..., :48].unflatten(-1, (3, 16))       # strided, like a slice of qkv
    b = torch.randn(2, 7, 3, 16, dtype=bf)
    wa, wb = torch.randn(16, dtype=bf), torch.randn(16, dtype=bf)
    cos, sin = torch.randn(12, 16), torch.randn(12, 16)
    ref = apply_rotary_emb(torch.cat([F.rms_norm(a, (16,), wa, 1e-6), F.rms_norm(b, (16,), wb, 1e-6)], 1),
                           (cos, sin), sequence_dim=1)
    out = norm_rope([a, b], [wa, wb], 1e-6, False, cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2])
    assert torch.equal(out, ref)
    x, w = torch.randn(2, 5, 48, dtype=bf), torch.randn(48, dtype=bf)
    fc, fs = torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16)
    y = F.rms_norm(x, (48,), w, 1e-6).unflatten(2, (3, -1))
    x1, x2 = y.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = fc[..., 0::2], fs[..., 1::2]
    ref = torch.empty_like(y)
    ref[..., 0::2], ref[..., 1::2] = x1 * c - x2 * s, x1 * s + x2 * c
    assert torch.equal(norm_rope([x.unflatten(2, (3, -1))], [w], 1e-6, True, c, s, c, s), ref)
    # diffusers' own RMSNorm (HunyuanVideo) rounds before the weight: round_first
    from diffusers.models.normalization import RMSNorm
    norm = RMSNorm(16, eps=1e-6).to(bf)
    with torch.no_grad():
        norm.weight.copy_(wb)
        ref = apply_rotary_emb(norm(b), (cos[5:], sin[5:]), sequence_dim=1)
    out = norm_rope([b], [wb], 1e-6, False, cos[5:, 0::2], sin[5:, 0::2], cos[5:, 1::2], sin[5:, 1::2], True)
    assert torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a GPU")
def test_norm_rope_kernel_on_cuda():
    """The Triton kernel against the op's torch path, bf16: FLUX's double-block form (two inputs, one strided)
    and Wan's whole-token norm with an odd head count."""
    from xdit_compile.runtime.norm_rope import _reference, norm_rope

    torch.manual_seed(0)
    d, bf = "cuda", torch.bfloat16
    a = torch.randn(2, 37, 3 * 24 * 128, device=d, dtype=bf)[..., :24 * 128].unflatten(-1, (24, 128))
    b = torch.randn(2, 300, 24, 128, device=d, dtype=bf)
    wa, wb = torch.randn(128, device=d, dtype=bf), torch.randn(128, device=d, dtype=bf)
    cos, sin = torch.randn(337, 128, device=d), torch.randn(337, 128, device=d)
    fr = (cos[:, 0::2], sin[:, 0::2], cos[:, 1::2], sin[:, 1::2])
    for round_first in (False, True):
        out = norm_rope([a, b], [wa, wb], 1e-6, False, *fr, round_first)
        ref = _reference([a, b], [wa, wb], 1e-6, False, fr, round_first)
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3
    x, w = torch.randn(1, 99, 40 * 128, device=d, dtype=bf).unflatten(2, (40, -1)), torch.randn(5120, device=d, dtype=bf)
    fc, fs = torch.randn(1, 99, 1, 128, device=d), torch.randn(1, 99, 1, 128, device=d)
    fr = (fc[..., 0::2], fs[..., 1::2], fc[..., 0::2], fs[..., 1::2])
    out, ref = norm_rope([x], [w], 1e-6, True, *fr), _reference([x], [w], 1e-6, True, fr)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3


def _norm_rope_sp(rank, world):
    import xdit_compile
    torch._dynamo.reset()
    res = {}
    for name in ("flux", "wan", "hunyuanvideo"):
        m = MODELS[name].build()
        kw = MODELS[name].inputs()
        with torch.no_grad():
            ref = m(**kw)[0]
            xdit_compile.parallelize(m, {"parallel": {"ulysses": 2}})
            out = m(**kw)[0]
        res[name] = ((out - ref).abs().max().item(), m._xdit_compiler.reports[0]["fused"].get("norm_rope"))
    return res


def test_fuse_norm_rope_under_ulysses():
    """After the sharding passes (reshapes with local sizes, this rank's cos / sin) the pass still matches, and the
    parallel output matches one process."""
    for res in run_distributed(_norm_rope_sp, 2):
        assert res["flux"][1] == 4 and res["wan"][1] == 2 and res["hunyuanvideo"][1] == 2, res
        assert max(r[0] for r in res.values()) < 1e-5, res


def _fuse_linears_on(gm, ex, fuse_gelu=True):
    from xdit_compile.passes.fuse_linears import fuse_linears_pass
    from xdit_compile.runtime import fused_linear

    class Ctx:
        fuse_report: dict = {}

    ctx = Ctx()
    ctx.example_inputs, ctx.fuse_gelu = ex, fuse_gelu
    if fuse_linears_pass(gm, ctx):
        gm.graph.lint()
        gm.recompile()
    return ctx.fuse_report["linears"]


def test_fuse_linears_pass_flux():
    """FLUX's image q/k/v, text add_q/k/v (double blocks) and single-block q/k/v become one GEMM each; proj_mlp
    (tanh-GELU, left to fuse_gelu) stays out. The same output; the parameters become views of the joined weight
    (joined when the graph first runs here; the backend joins them right after lowering), and a second compile
    joins nothing anew: it takes views of what the first one joined."""
    from xdit_compile.runtime import fused_linear

    case = MODELS["flux"]
    m = case.build()
    cfg = m.config
    q = m.transformer_blocks[0].attn.to_q.weight
    before = q.detach().clone()
    sizes, first = [], set()
    for gm, ex in _capture_with_inputs(m, case.inputs()):
        with torch.no_grad():
            ref = gm(*ex)
        sizes += _fuse_linears_on(gm, ex)
        first |= {n.args[1] for n in gm.graph.nodes if n.target is torch.ops.xdit.sibling_linear.default}
        with torch.no_grad():
            out = gm(*ex)
        for a, b in zip(ref, out):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert sizes == [3] * (2 * cfg.num_layers) + [3] * cfg.num_single_layers, sizes
    attn = m.transformer_blocks[0].attn
    k, v = attn.to_k.weight, attn.to_v.weight
    assert torch.equal(q, before) and isinstance(q, nn.Parameter)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert v.storage_offset() == k.storage_offset() + k.numel() == q.storage_offset() + 2 * q.numel()
    ptr, keys = q.data_ptr(), set()
    for gm, ex in _capture_with_inputs(m, case.inputs(seed=1)):
        _fuse_linears_on(gm, ex)
        keys |= {n.args[1] for n in gm.graph.nodes if n.target is torch.ops.xdit.sibling_linear.default}
    assert len(keys) == len(first) and not keys & set(fused_linear._PENDING)   # views of the joined weights
    assert q.data_ptr() == ptr and all(fused_linear._HELD[k][0].untyped_storage().data_ptr()
                                       in {p.untyped_storage().data_ptr() for p in m.parameters()} for k in keys)
    gm0, ex0 = gm, ex
    with torch.no_grad():            # a weight loaded in place is what the joined GEMM uses
        before = gm0(*ex0)[0]
        attn.to_k.weight.mul_(2)
        after = gm0(*ex0)[0]
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, m(**case.inputs(seed=1))[0], rtol=1e-5, atol=1e-5)


def test_fuse_linears_only_few_rows(monkeypatch):
    """Groups of more rows per rank than MAX_ROWS stay separate GEMMs: tiny FLUX (7 text, 24 image, 31 joint
    tokens) with MAX_ROWS 8 joins only the text stream's add_q/k/v."""
    from xdit_compile.passes import fuse_linears

    monkeypatch.setattr(fuse_linears, "MAX_ROWS", 8)
    case = MODELS["flux"]
    m = case.build()
    sizes = []
    for gm, ex in _capture_with_inputs(m, case.inputs()):
        sizes += _fuse_linears_on(gm, ex)
    assert sizes == [3] * m.config.num_layers, sizes


def test_fuse_linears_leaves_gelu_linear_without_fuse_gelu_off():
    """proj_mlp joins the single block's q/k/v when fuse_gelu is off (nothing else would fuse it)."""
    case = MODELS["flux"]
    m = case.build()
    sizes = []
    for gm, ex in _capture_with_inputs(m, case.inputs()):
        sizes += _fuse_linears_on(gm, ex, fuse_gelu=False)
    assert sizes.count(4) == m.config.num_single_layers, sizes


def _fuse_linears_sp(rank, world):
    import xdit_compile
    torch._dynamo.reset()
    res = {}
    for name in ("flux", "wan"):
        m = MODELS[name].build()
        kw = MODELS[name].inputs()
        with torch.no_grad():
            ref = m(**kw)[0]
            xdit_compile.parallelize(m, {"parallel": {"ulysses": 2}, "compile": {"fuse_linears": True}})
            out = m(**kw)[0]
        res[name] = ((out - ref).abs().max().item(), m._xdit_compiler.reports[0]["fused"].get("linears"))
    return res


def test_fuse_linears_under_ulysses():
    """With Ulysses 2 (the eager lowering's attention ops, this rank's tokens) the joined GEMMs give the output of
    one process: FLUX's q/k/v groups, Wan's self-attention q/k/v and cross-attention k/v."""
    for res in run_distributed(_fuse_linears_sp, 2):
        assert res["flux"][1] and res["wan"][1], res
        assert max(r[0] for r in res.values()) < 1e-5, res


@pytest.mark.parametrize("name,per_block", [("flux", None), ("wan", 2)])
def test_attention_kernel_pass_swaps_sdpa(name, per_block):
    """With attention backend fa3_cute every SDPA of a bfloat16 model without mask (FLUX's joint attention, Wan's
    self- and cross-attention) becomes xdit.fa3_attention; the same output (off sm90 the op runs SDPA); a float32
    model keeps SDPA (not the kernel's dtype); other backends leave the graph alone."""
    from xdit_compile.passes.attention_kernel import attention_kernel_pass
    from xdit_compile.passes.token_dims import SDPA

    case = MODELS[name]
    for dtype, ok in ((torch.bfloat16, True), (torch.float32, False)):
        m = case.build().to(dtype)
        inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in case.inputs().items()}
        swapped = sdpa = 0
        for gm, ex in _capture_with_inputs(m, inputs):
            with torch.no_grad():
                ref = gm(*ex)
            sdpa += sum(n.target in SDPA for n in gm.graph.nodes)

            class Ctx:
                fuse_report: dict = {}
                attention_backend = "sdpa"

            ctx = Ctx()
            assert not attention_kernel_pass(gm, ctx)
            ctx.attention_backend = "fa3_cute"
            if attention_kernel_pass(gm, ctx):
                gm.graph.lint()
                gm.recompile()
            swapped += ctx.fuse_report["fa3_attention"]
            with torch.no_grad():
                out = gm(*ex)
            for a, b in zip(ref, out):
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert sdpa > 0 and swapped == (sdpa if ok else 0), (dtype, sdpa, swapped)
        if per_block and ok:
            assert swapped == per_block * len(m.blocks)


def test_attention_backend_resolution():
    """auto stays SDPA where the kernel cannot run (CPU, or no flash_attn.cute); asking for fa3_cute there is an
    error at compile time that names the missing pieces and the fix."""
    from xdit_compile.runtime import flash_cute
    from xdit_compile.runtime._lse import resolve_backend

    assert resolve_backend("auto", "cpu") == "auto" and resolve_backend("sdpa", "cuda") == "sdpa"
    if flash_cute.available():
        pytest.skip("the kernel runs here")
    assert resolve_backend("auto", "cuda") == "auto"
    with pytest.raises(ValueError, match="fa3_cute.*nvidia-cutlass-dsl.*backend='auto'"):
        resolve_backend("fa3_cute", "cpu")


class _CatLinears(nn.Module):
    """One linear over a wide concatenation (split) and one over a narrow one (left alone)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(4 + 12, 4)
        self.narrow = nn.Linear(4 + 4, 6)

    def forward(self, a, m):
        return self.wide(torch.cat([a, m], -1)).sum(-1) + self.narrow(torch.cat([a, m[..., :4]], -1)).sum(-1)


def _cat_dim(cat):
    return cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)


def _split_on(gm):
    from xdit_compile.passes.split_cat_linears import split_cat_linears_pass

    class Ctx:
        fuse_report: dict = {}

    ctx = Ctx()
    if split_cat_linears_pass(gm, ctx):
        gm.graph.lint()
        gm.recompile()
    return ctx.fuse_report["split_cat_linears"]


@pytest.mark.parametrize("name", ["flux", "hunyuanvideo"])
def test_split_cat_linears_pass_counts_and_numerics(name):
    """FLUX's and HunyuanVideo's single-block proj_out over [attention, mlp] (5x its output's width) becomes one
    linear per part, the same output; a linear over a concatenation less than twice its output's width stays
    whole."""
    case = MODELS[name]
    m = case.build()
    count = 0
    for gm, ex in _capture_with_inputs(m, case.inputs()):
        with torch.no_grad():
            ref = gm(*ex)
        count += _split_on(gm)
        assert not [n for n in gm.graph.nodes if n.target in (torch._C._nn.linear, F.linear)
                    and getattr(n.args[0], "target", None) is torch.cat
                    and _cat_dim(n.args[0]) in (-1, n.args[0].meta["example_value"].dim() - 1)], gm.code
        with torch.no_grad():
            out = gm(*ex)
        for a, b in zip(ref, out):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert count == m.config.num_single_layers
    toy = _CatLinears()
    a, mm = torch.randn(2, 3, 4), torch.randn(2, 3, 12)
    gms = _capture_with_inputs(toy, {"a": a, "m": mm})
    assert [_split_on(gm) for gm, _ in gms] == [1]
    torch.testing.assert_close(gms[0][0](*gms[0][1])[0], toy(a, mm), rtol=1e-5, atol=1e-5)


def test_split_cat_linears_in_the_pipeline():
    """parallelize at world size 1 runs the pass (explain names it) and gives the model's output; off, nothing is
    split."""
    import xdit_compile

    case = MODELS["flux"]
    for on in (True, False):
        torch._dynamo.reset()
        m = case.build()
        with torch.no_grad():
            ref = m(**case.inputs())[0]
            xdit_compile.parallelize(m, {"compile": {"split_cat_linears": on}})
            out = m(**case.inputs())[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        got = sum(r["fused"].get("split_cat_linears", 0) for r in m._xdit_compiler.reports)
        assert got == (m.config.num_single_layers if on else 0), got
        assert ("split_cat_linears:" in xdit_compile.explain(m)) == on


def test_max_autotune_reaches_inductor(monkeypatch):
    """compile.max_autotune = true: Inductor compiles the step with its GEMM autotuning on (ATEN and TRITON
    backends) and the output is the model's; off, the patch is absent."""
    import torch._inductor.compile_fx as cfx

    import xdit_compile

    real, seen = cfx.compile_fx, []

    def recording(gm, example_inputs, config_patches=None, **kw):
        if config_patches is not None:   # compile_fx calls itself again without them once they are applied
            seen.append(dict(config_patches))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", recording)
    case = MODELS["flux"]
    for on in (True, False):
        torch._dynamo.reset()
        seen.clear()
        m = case.build()
        with torch.no_grad():
            ref = m(**case.inputs())[0]
            xdit_compile.parallelize(m, {"compile": {"lowering": "inductor", "max_autotune": on}})
            out = m(**case.inputs())[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert seen, "Inductor was not called"
        assert all(p.get("max_autotune_gemm", False) == on for p in seen), seen
        assert all((p.get("max_autotune_gemm_backends") == "ATEN,TRITON") == on for p in seen), seen

