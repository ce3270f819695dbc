"""Cache acceleration (insert_cache_skip pass): exact at threshold 0, rank-consistent skips, no graph break.

Every model runs a short "denoising" sequence (inputs and timestep shrink a little per step) through:
the uncached model, fbcache and teacache with threshold 0 (must equal the uncached outputs bit for bit:
the compute branch is the same ops) and with a positive threshold (some steps must be skipped). Under
ulysses=2 and cfg=2 (gloo) the uncached reference is the parallelized model without cache (bitwise), also
checked against the one-process model (1e-4), and the skipped steps of every rank are compared: the
statistic is all-reduced before the decision, so they must be identical.

Cost: one run_distributed call per plan loops over all models (dynamo tracing dominates).
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from dist_utils import run_distributed
from models import MODELS

STEPS = 5
MODELS_UNDER_TEST = ("flux", "pixart", "wan", "digits")
THRESHOLDS = {"fbcache": 0.3, "teacache": 0.3}


# --- worker side --------------------------------------------------------------------------------------

def _build(name: str):
    """(model, inputs) with batch 2 ([cond, uncond]-like, so cfg=2 can split it) and >= 2 blocks."""
    if name == "digits":
        from xdit_compile.builtin.digits import load_transformer
        g = torch.Generator().manual_seed(0)
        inputs = dict(hidden_states=torch.randn(2, 1, 16, 16, generator=g), timestep=torch.full((2,), 700.0),
                      class_labels=torch.tensor([3, 10]), return_dict=False)
        return load_transformer(), inputs
    case = MODELS[name]
    cfg = dict(case.config)
    if name != "flux":
        cfg["num_layers"] = 2
    model = dataclasses.replace(case, config=cfg).build()
    return model, case.inputs(batch=2)


def _steps(inputs: dict, n: int = STEPS) -> list[dict]:
    """A stand-in for a denoising loop: hidden states and timestep change a little each step."""
    out = []
    g = torch.Generator().manual_seed(1)
    h = inputs["hidden_states"]
    for i in range(n):
        x = dict(inputs)
        x["hidden_states"] = h * (1 - 0.04 * i) + 0.02 * i * torch.randn(h.shape, generator=g)
        x["timestep"] = inputs["timestep"] * (1 - 0.05 * i)
        out.append(x)
    return out


def _run(model, steps, *, cached: bool, threshold=None) -> tuple[list[torch.Tensor], list[int]]:
    import xdit_compile
    if not cached:
        with torch.no_grad():
            return [model(**x)[0] for x in steps], []
    with xdit_compile.cache_state(model, num_steps=len(steps), threshold=threshold) as st, torch.no_grad():
        outs = [model(**x)[0] for x in steps]
    return outs, st.summary()["skipped_steps"]


def _rel(a, b) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


def _check_models(parallel: dict | None, models=MODELS_UNDER_TEST, lowering="eager") -> dict:
    """Per model: exactness at threshold 0 and the skipped steps at a positive threshold."""
    import xdit_compile
    res = {}
    for name in models:
        torch._dynamo.reset()
        model, inputs = _build(name)
        steps = _steps(inputs)
        ref, _ = _run(model, steps, cached=False)
        # exact against the same plan without the cache (also alone: its passes, e.g. split_cat_linears, round
        # differently from the plain model)
        base = _build(name)[0]
        xdit_compile.parallelize(base, {"parallel": parallel or {}, "compile": {"lowering": lowering}})
        exact_ref, _ = _run(base, steps, cached=False)
        r = {"base_err": _rel(exact_ref, ref)}
        for method in ("fbcache", "teacache"):
            m = _build(name)[0]
            # the plan says threshold 0; the positive one is a per-request override of the same compiled graph
            xdit_compile.parallelize(m, {"parallel": parallel or {}, "compile": {"lowering": lowering},
                                         "cache": {"method": method, "threshold": 0.0}})
            for thr in (0.0, THRESHOLDS[method]):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # teacache without coefficients on these models
                    outs, skipped = _run(m, steps, cached=True, threshold=thr)
                key = f"{method}@{thr:g}"
                r[key] = {"skipped": skipped, "err": _rel(outs, ref),
                          "exact": all(torch.equal(o, e) for o, e in zip(outs, exact_ref)),
                          "finite": all(bool(torch.isfinite(o).all()) for o in outs)}
                if thr == 0.0:
                    r[key]["explain"] = xdit_compile.explain(m)
            r[method + "_graphs"] = len(m._xdit_compiler.reports)
        res[name] = r
    return res


def _dist_check(rank, world, parallel):
    return _check_models(parallel)


# --- tests --------------------------------------------------------------------------------------------

_CACHE: dict = {}


def _results(plan: str):
    if plan not in _CACHE:
        if plan == "alone":
            _CACHE[plan] = [_check_models(None)]
        else:
            parallel = {"ulysses2": {"ulysses": 2}, "cfg2": {"cfg": 2}}[plan]
            _CACHE[plan] = run_distributed(_dist_check, 2, parallel, timeout=400)
    return _CACHE[plan]


@pytest.mark.parametrize("plan", ["alone", "ulysses2", "cfg2"])
@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_threshold_zero_is_exact(plan, model):
    for rank, res in enumerate(_results(plan)):
        r = res[model]
        assert r["base_err"] < 1e-4, (rank, r["base_err"])
        for method in ("fbcache", "teacache"):
            c = r[f"{method}@0"]
            assert c["skipped"] == [], (rank, method, c)
            assert c["exact"], (rank, method, c["err"])
            assert "cache " + method in c["explain"] and "not applied" not in c["explain"], c["explain"]
            assert r[method + "_graphs"] == 1                     # the threshold override did not recompile


@pytest.mark.parametrize("plan", ["alone", "ulysses2", "cfg2"])
@pytest.mark.parametrize("model", MODELS_UNDER_TEST)
def test_positive_threshold_skips_the_same_steps_on_every_rank(plan, model):
    per_rank = _results(plan)
    for method in ("fbcache", "teacache"):
        key = f"{method}@{THRESHOLDS[method]:g}"
        skipped = [res[model][key]["skipped"] for res in per_rank]
        assert skipped[0], (method, "no step skipped", per_rank[0][model][key])
        assert 0 not in skipped[0]                                  # warmup: the first step is computed
        if method == "teacache":
            assert STEPS - 1 not in skipped[0]                      # and TeaCache's last one
        assert all(s == skipped[0] for s in skipped), (method, skipped)
        assert all(res[model][key]["finite"] for res in per_rank)
        assert all(res[model][key]["err"] < 0.5 for res in per_rank), [res[model][key]["err"] for res in per_rank]


def test_two_interleaved_requests_do_not_share_state():
    """Two states on one model, calls interleaved: each equals the same request run alone."""
    import xdit_compile
    torch._dynamo.reset()
    model, inputs = _build("digits")
    xdit_compile.parallelize(model, {"cache": {"method": "fbcache", "threshold": THRESHOLDS["fbcache"]}})
    a_steps = _steps(inputs)
    b_steps = _steps({**inputs, "hidden_states": -inputs["hidden_states"].flip(-1)})
    alone_a, _ = _run(model, a_steps, cached=True)
    alone_b, _ = _run(model, b_steps, cached=True)
    sa = xdit_compile.cache_state(model, num_steps=STEPS)
    sb = xdit_compile.cache_state(model, num_steps=STEPS)
    got_a, got_b = [], []
    with torch.no_grad():
        for xa, xb in zip(a_steps, b_steps):
            with sa:
                got_a.append(model(**xa)[0])
            with sb:
                got_b.append(model(**xb)[0])
    assert all(torch.equal(x, y) for x, y in zip(got_a, alone_a))
    assert all(torch.equal(x, y) for x, y in zip(got_b, alone_b))
    assert sa.summary()["skipped"] > 0 and sa.summary()["steps"] == STEPS == sb.summary()["steps"]


def test_forced_pattern_and_summary():
    import xdit_compile
    torch._dynamo.reset()
    model, inputs = _build("digits")
    xdit_compile.parallelize(model, {"cache": {"method": "fbcache", "threshold": 0.0}})
    steps = _steps(inputs)
    pattern = {1: "skip", 3: "skip"}
    with xdit_compile.cache_state(model, force=pattern.get) as st, torch.no_grad():
        outs = [model(**x)[0] for x in steps]
    s = st.summary()
    assert s["skipped_steps"] == [1, 3] and s["computed"] == 3 and s["steps"] == 5
    assert "3 of 5 steps computed, 2 skipped" in st.format_summary()
    assert xdit_compile.cache_summary(model)["skipped_steps"] == [1, 3]
    # a skipped step is block 0 + the cached residual: close to, not equal to, the computed output
    with torch.no_grad():
        full = model._xdit_orig_forward(**steps[1])[0]
    assert not torch.equal(outs[1], full) and ((outs[1] - full).norm() / full.norm()) < 0.5


def test_inductor_fullgraph_no_graph_break_and_bounded_recompiles():
    """Inductor + fullgraph=True over a 20-step run: one graph, no break, compiled once."""
    import xdit_compile
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, inputs = _build("digits")
    xdit_compile.parallelize(model, {"compile": {"lowering": "inductor", "fullgraph": True},
                                     "cache": {"method": "fbcache", "threshold": THRESHOLDS["fbcache"]}})
    steps = _steps(inputs, 20)
    with xdit_compile.cache_state(model, num_steps=20) as st, torch.no_grad():
        outs = [model(**x)[0] for x in steps]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(model._xdit_compiler.reports) == 1                   # one graph, compiled once
    assert counters["stats"]["unique_graphs"] <= 1, dict(counters["stats"])
    s = st.summary()
    assert s["steps"] == 20 and 0 < s["skipped"] < 20, s
    with torch.no_grad():
        ref = model._xdit_orig_forward(**steps[0])[0]
    assert ((outs[0] - ref).norm() / ref.norm()) < 1e-4            # step 0 is computed


def test_plan_cache_section_errors():
    from xdit_compile.plan import Plan
    for bad, msg in [({"method": "tea"}, "cache.method must be one of"), ({"threshold": -1}, "cache.threshold"),
                     ({"warmup_steps": -1}, "cache.warmup_steps"), ({"coefficients": []}, "cache.coefficients"),
                     ({"thresh": 1}, "did you mean 'threshold'")]:
        with pytest.raises(ValueError, match=msg):
            Plan.from_dict({"cache": bad})
    p = Plan.from_dict({"cache": {"method": "teacache", "coefficients": [1, 2.5]}})
    assert p.cache.coefficients == (1.0, 2.5) and Plan.from_dict(p.to_dict()) == p


def test_pass_only_in_the_pipeline_when_on():
    from types import SimpleNamespace

    from xdit_compile.passes.manager import build_pipeline
    from xdit_compile.plan import Plan
    for method, expect in (("none", []), ("fbcache", ["insert_cache_skip"]), ("teacache", ["insert_cache_skip"])):
        ctx = SimpleNamespace(sp_size=1, cfg_split=False, disabled_passes=frozenset(),
                              cache_config=Plan.from_dict({"cache": {"method": method}}).cache)
        assert [n for n, _ in build_pipeline(ctx)] == expect
    ctx.disabled_passes = frozenset({"insert_cache_skip"})
    assert build_pipeline(ctx) == []


def test_calibrate_writes_coefficients(tmp_path):
    from xdit_compile.pipelines.calibrate import write_coefficients
    from xdit_compile.plan import load_plan
    plan = tmp_path / "p.toml"
    plan.write_text('model = "builtin:digits"\n\n[cache]\nthreshold = 0.2\ncoefficients = [9.0]\n\n[run]\nnum_images = 2\n')
    write_coefficients(plan, [2.0, -1.5, 0.25])
    p = load_plan(plan)
    assert p.cache.coefficients == (2.0, -1.5, 0.25) and p.cache.method == "teacache" and p.cache.threshold == 0.2
    assert p.run.num_images == 2
    other = tmp_path / "q.toml"
    other.write_text('model = "builtin:digits"\n')
    write_coefficients(other, [1.0, 0.0])
    assert load_plan(other).cache.coefficients == (1.0, 0.0)
