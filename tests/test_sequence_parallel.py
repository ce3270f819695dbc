"""End to end: real diffusers DiT classes (tiny configs, tests/models.py) x sequence-parallel plans.

Every case runs in gloo worker processes: the worker builds the model, computes the unparallelized output,
calls ``xdit_compile.parallelize`` and runs the model again; the test checks that every rank got the
reference output (relative error < 1e-4) and that the parallel path really ran (attention rewritten to
Ulysses / ring / USP, bytes sent, the plan's sequence-parallel degree in the reports).

Cost: dynamo tracing dominates (~5-10 s per model per process on CPU), so each group of cases is ONE
``run_distributed`` call whose worker loops over the models; the tests are parametrized per model and read
the group's results from a cache, so a failure still names its model and plan. A group runs on first use
only (``-k flux`` runs only the groups flux is in).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from dist_utils import each_case, run_distributed
from models import MODELS

REL_TOL = 1e-4
PARALLEL_KINDS = ("ulysses", "ring", "usp")

GRID_MODELS = [
    "flux", "sd3", "pixart", "hunyuandit", "cogvideox", "wan",
    "hunyuanvideo", "ltxvideo", "sana", "latte", "mochi", "qwenimage",
]
LINEAR_ATTENTION = {"sana"}
"""Models whose self-attention is not SDPA: the proof of parallelism is an all-reduce over sharded tokens."""

PLANS = {  # name -> (parallel degrees, world size)
    "ulysses2": ({"ulysses": 2}, 2),
    "ring2": ({"ring": 2}, 2),
    "ulysses2xring2": ({"ulysses": 2, "ring": 2}, 4),
}

XFAIL: dict[tuple[str, str], str] = {}
"""(plan, model) -> reason, for cases known broken in xdit_compile (strict=False: a fix shows as XPASS)."""


# --- worker side --------------------------------------------------------------------------------------


def _flux_heads(heads: int) -> dict:
    """Flux config with another head count; attention_head_dim (and the rope axes summing to it) stay."""
    config = dict(MODELS["flux"].config)
    config["num_attention_heads"] = heads
    assert sum(config["axes_dims_rope"]) == config["attention_head_dim"]
    return config


def _run_case(case: dict) -> dict:
    """Build, reference forward, parallelize, parallel forward; what the test needs, picklable."""
    import diffusers

    import xdit_compile

    torch._dynamo.reset()  # dynamo caches by code object: every model compiles from scratch
    model_case = MODELS[case["model"]]
    if case.get("config") is not None:
        torch.manual_seed(0)
        model = getattr(diffusers, model_case.cls_name)(**case["config"]).eval()
    else:
        model = model_case.build()
    inputs = model_case.inputs(**case.get("size", {}))
    with torch.no_grad():
        ref = model(**inputs)[0]
    plan = xdit_compile.Plan.from_dict(
        {"parallel": case["parallel"], "compile": {"lowering": case.get("lowering", "eager"), **case.get("compile", {})}}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xdit_compile.parallelize(model, plan)
        with torch.no_grad():
            out = model(**inputs)[0]
    reports = model._xdit_compiler.reports
    attention = [a for r in reports for a in r["attention"]]
    events = [e for r in reports for e in r["events"]]
    result = {
        "shape": tuple(out.shape),
        "ref_shape": tuple(ref.shape),
        "rel_err": ((out - ref).norm() / ref.norm()).item() if out.shape == ref.shape else float("inf"),
        "finite": bool(torch.isfinite(out).all()),
        "n_graphs": len(reports),
        "sp_sizes": [r["sp_size"] for r in reports],
        "units": [u for r in reports for u in r["units"]],
        "became": [a["became"] for a in attention],
        "n_parallel_attention": sum(a["became"].startswith(PARALLEL_KINDS) for a in attention),
        "attention_bytes": sum(a.get("bytes", 0) for a in attention),
        "event_bytes": sum(e.get("bytes", 0) for e in events),
        "event_kinds": sorted({e["kind"] for e in events}),
        "graph_warnings": [str(w.message) for w in caught
                           if issubclass(w.category, UserWarning) and "graph" in str(w.message)],
        "explain": xdit_compile.explain(model),
    }
    if case.get("idempotence"):
        result["idempotence"] = _idempotence(model, plan, inputs, out)
    return result


def _idempotence(model, plan, inputs, out) -> dict:
    """parallelize() again with an equal plan: a no-op; with another plan: ValueError."""
    import xdit_compile

    forward, compiler, n_reports = model.forward, model._xdit_compiler, len(model._xdit_compiler.reports)
    again = xdit_compile.parallelize(model, xdit_compile.Plan.from_dict(plan.to_dict()))
    with torch.no_grad():
        out2 = model(**inputs)[0]
    other = {**plan.to_dict(), "compile": {"lowering": "inductor" if plan.compile.lowering == "eager" else "eager"}}
    try:
        xdit_compile.parallelize(model, other)
        other_error = None
    except ValueError as e:
        other_error = str(e)
    return {
        "returned_model": again is model,
        "same_forward": model.forward is forward and model._xdit_compiler is compiler,
        "recompiled": len(model._xdit_compiler.reports) != n_reports,
        "same_output": torch.equal(out, out2),
        "other_plan_error": other_error,
        "plan_kept": model._xdit_plan == plan,
    }


def _run_cases(rank: int, world_size: int, cases: dict[str, dict]) -> dict[str, dict]:
    """Run every case, catching errors per case."""
    return each_case(_run_case, cases)


# --- parent side --------------------------------------------------------------------------------------


GROUPS: dict[str, tuple[int, dict[str, dict], float]] = {}
"""Group name -> (world size, {case key: case}, timeout): one run_distributed call each."""


def _add_group(name: str, world_size: int, cases: dict[str, dict], timeout: float) -> None:
    GROUPS[name] = (world_size, cases, timeout)


for _plan, (_parallel, _world) in PLANS.items():
    _add_group(_plan, _world, {m: {"model": m, "parallel": _parallel} for m in GRID_MODELS},
               timeout=900 if _world > 2 else 600)

_add_group("inductor", 2, {m: {"model": m, "parallel": {"ulysses": 2}, "lowering": "inductor"}
                           for m in ("flux", "wan", "pixart")}, timeout=900)

UNEVEN_4 = {
    # 5x5 = 25 image tokens, 9 text tokens, 34 joint: none divisible by 4, the joint length not even by 4.
    "flux_img25_txt9_usp": {"model": "flux", "parallel": {"ulysses": 2, "ring": 2},
                            "size": {"height": 5, "width": 5, "text_len": 9}},
    # a 1008x1008-like grid (63x63 latent tokens): odd in both dims
    "flux_grid7x9_usp": {"model": "flux", "parallel": {"ulysses": 2, "ring": 2},
                         "size": {"height": 7, "width": 9}},
}
UNEVEN_2 = {
    "flux_heads3_ulysses2": {"model": "flux", "parallel": {"ulysses": 2}, "config": _flux_heads(3)},
    "flux_grid7x9_ulysses2": {"model": "flux", "parallel": {"ulysses": 2}, "size": {"height": 7, "width": 9}},
    "flux_grid7x9_ring2": {"model": "flux", "parallel": {"ring": 2}, "size": {"height": 7, "width": 9}},
    "lumina2_ulysses2": {"model": "lumina2", "parallel": {"ulysses": 2}},
    "flux_idempotence_ulysses2": {"model": "flux", "parallel": {"ulysses": 2}, "idempotence": True},
    # ring attention with k/v by the copy engines (runtime/ce_ring.py; on CPU its gloo fallback, same layout and merge)
    "flux_ring2_ce": {"model": "flux", "parallel": {"ring": 2}, "size": {"text_len": 8},
                      "compile": {"ring_transfer": "copy_engine"}},
    "wan_ring2_ce": {"model": "wan", "parallel": {"ring": 2}, "compile": {"ring_transfer": "copy_engine"}},
}
_add_group("uneven4", 4, UNEVEN_4, timeout=600)
_add_group("extras2", 2, UNEVEN_2, timeout=600)

_RESULTS: dict[str, object] = {}


def _group_results(group: str) -> list[dict[str, dict]]:
    """Per-rank {case key: result} of a group, computed once per session (a failure is cached too)."""
    if group not in _RESULTS:
        world_size, cases, timeout = GROUPS[group]
        try:
            _RESULTS[group] = run_distributed(_run_cases, world_size, cases, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - every test of the group reports it, none re-runs it
            _RESULTS[group] = e
    value = _RESULTS[group]
    if isinstance(value, Exception):
        pytest.fail(f"group {group!r} did not run: {value}", pytrace=False)
    return value


def _case_results(group: str, key: str) -> list[dict]:
    """One case's result on every rank; fails with the worker's traceback if it raised."""
    per_rank = [r[key] for r in _group_results(group)]
    errors = {rank: r["error"] for rank, r in enumerate(per_rank) if "error" in r}
    if errors:
        shown = {}
        for rank, tb in errors.items():
            shown.setdefault(tb, []).append(rank)
        pytest.fail("\n".join(f"--- ranks {ranks} ---\n{tb}" for tb, ranks in shown.items()), pytrace=False)
    return per_rank


def _check_matches(per_rank: list[dict], label: str) -> None:
    for rank, r in enumerate(per_rank):
        assert r["shape"] == r["ref_shape"], f"{label} rank {rank}: output shape {r['shape']} != {r['ref_shape']}"
        assert r["finite"], f"{label} rank {rank}: non-finite output"
        assert r["rel_err"] < REL_TOL, (
            f"{label} rank {rank}: relative error {r['rel_err']:.3e} >= {REL_TOL}\n{r['explain']}")


def _expected_kind(parallel: dict) -> str:
    """What a rewritten attention's "became" starts with under these degrees."""
    ulysses, ring = parallel.get("ulysses", 1), parallel.get("ring", 1)
    return "usp" if ulysses > 1 and ring > 1 else "ulysses" if ulysses > 1 else "ring"


def _check_parallel(per_rank: list[dict], sp_size: int, label: str, *, linear_attention: bool = False,
                    kind: str | None = None) -> None:
    for rank, r in enumerate(per_rank):
        assert r["n_graphs"] >= 1, f"{label} rank {rank}: no graph was compiled"
        assert all(s == sp_size for s in r["sp_sizes"]), f"{label} rank {rank}: sp_size {r['sp_sizes']} != {sp_size}"
        if linear_attention:
            assert "all_reduce" in r["event_kinds"] and "shard" in r["event_kinds"], (
                f"{label} rank {rank}: no shard + all_reduce events (events: {r['event_kinds']})\n{r['explain']}")
            assert r["event_bytes"] > 0, f"{label} rank {rank}: nothing sent\n{r['explain']}"
        else:
            assert r["n_parallel_attention"] > 0, (
                f"{label} rank {rank}: no attention became ulysses/ring/usp ({r['became']})\n{r['explain']}")
            assert r["attention_bytes"] > 0, f"{label} rank {rank}: parallel attention sent 0 bytes\n{r['explain']}"
            if kind is not None:
                wrong = [b for b in r["became"] if b.startswith(PARALLEL_KINDS) and not b.startswith(kind)]
                assert not wrong, f"{label} rank {rank}: expected {kind} attention, got {wrong}"
    first = per_rank[0]
    for rank, r in enumerate(per_rank[1:], 1):  # every rank compiled the same program
        assert (r["became"], r["units"], r["n_graphs"]) == (first["became"], first["units"], first["n_graphs"]), (
            f"{label}: rank {rank} compiled differently from rank 0")


def _grid_params():
    for plan in PLANS:
        for model in GRID_MODELS:
            marks = [pytest.mark.xfail(strict=False, reason=XFAIL[plan, model])] if (plan, model) in XFAIL else []
            yield pytest.param(plan, model, id=f"{plan}-{model}", marks=marks)


# --- the grid -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan,model", list(_grid_params()))
def test_grid(plan, model):
    parallel, world_size = PLANS[plan]
    per_rank = _case_results(plan, model)
    assert len(per_rank) == world_size
    label = f"{model} {plan}"
    _check_matches(per_rank, label)
    _check_parallel(per_rank, parallel.get("ulysses", 1) * parallel.get("ring", 1), label,
                    linear_attention=model in LINEAR_ATTENTION, kind=_expected_kind(parallel))


@pytest.mark.parametrize("model", ["flux", "wan", "pixart"])
def test_inductor_lowering(model):
    per_rank = _case_results("inductor", model)
    label = f"{model} ulysses2 inductor"
    _check_matches(per_rank, label)
    _check_parallel(per_rank, 2, label, kind="ulysses")


# --- uneven shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(UNEVEN_4))
def test_uneven_tokens_usp(key):
    per_rank = _case_results("uneven4", key)
    _check_matches(per_rank, key)
    _check_parallel(per_rank, 4, key, kind="usp")
    # the odd token segments really were sharded (not all left at full size)
    assert any(u % 4 for u in per_rank[0]["units"]), f"{key}: sharded segments {per_rank[0]['units']}"


@pytest.mark.parametrize("key", ["flux_grid7x9_ulysses2", "flux_grid7x9_ring2"])
def test_odd_grid_2(key):
    per_rank = _case_results("extras2", key)
    _check_matches(per_rank, key)
    _check_parallel(per_rank, 2, key, kind=_expected_kind(UNEVEN_2[key]["parallel"]))
    assert any(u % 2 for u in per_rank[0]["units"]), f"{key}: sharded segments {per_rank[0]['units']}"


@pytest.mark.parametrize("key", ["flux_ring2_ce", "wan_ring2_ce"])
def test_ring_copy_engine_plan(key):
    """compile.ring_transfer = "copy_engine": every sequence-parallel attention became the copy-engine ring (the
    even shards of these sizes) and the output matches one process."""
    per_rank = _case_results("extras2", key)
    _check_matches(per_rank, key)
    _check_parallel(per_rank, 2, key, kind="ring x2 (k/v by the copy engines)")


def test_heads_not_divisible_ulysses():
    """3 heads over ulysses=2: the output must still match, and attention still goes through Ulysses."""
    per_rank = _case_results("extras2", "flux_heads3_ulysses2")
    _check_matches(per_rank, "flux heads=3 ulysses2")
    _check_parallel(per_rank, 2, "flux heads=3 ulysses2", kind="ulysses")  # still Ulysses (heads padded), not a local fallback


# --- graph breaks -------------------------------------------------------------------------------------


def test_graph_break_lumina2():
    per_rank = _case_results("extras2", "lumina2_ulysses2")
    _check_matches(per_rank, "lumina2 ulysses2")
    for rank, r in enumerate(per_rank):
        assert r["n_graphs"] > 1, f"rank {rank}: expected several dynamo graphs, got {r['n_graphs']}"
        assert r["graph_warnings"], f"rank {rank}: no UserWarning about graphs"
        assert any(f"{r['n_graphs']} graphs" in m for m in r["graph_warnings"]), r["graph_warnings"]
        assert all(s == 2 for s in r["sp_sizes"])
    # still parallel somewhere
    assert per_rank[0]["n_parallel_attention"] > 0, per_rank[0]["explain"]


def test_single_graph_models_do_not_warn():
    per_rank = _case_results("extras2", "flux_grid7x9_ulysses2")
    assert per_rank[0]["n_graphs"] == 1 and not per_rank[0]["graph_warnings"], per_rank[0]["graph_warnings"]


# --- idempotence and world size 1 ---------------------------------------------------------------------


def test_parallelize_twice_ulysses2():
    per_rank = _case_results("extras2", "flux_idempotence_ulysses2")
    _check_matches(per_rank, "flux ulysses2")
    for rank, r in enumerate(per_rank):
        i = r["idempotence"]
        assert i["returned_model"] and i["same_forward"] and i["plan_kept"], i
        assert not i["recompiled"] and i["same_output"], i
        assert i["other_plan_error"] is not None and "different plan" in i["other_plan_error"], i


def test_world_size_1_in_process(monkeypatch):
    """Degrees all 1 in a plain process (one-rank group made by ParallelDims): numerically a no-op;
    parallelize twice with an equal plan is a no-op, with a different plan a ValueError."""
    import torch.distributed as dist

    import xdit_compile

    if dist.is_initialized() and dist.get_world_size() != 1:
        pytest.skip("this process already belongs to a multi-rank group")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a plain `python script.py`, not torchrun
        monkeypatch.delenv(var, raising=False)
    torch._dynamo.reset()
    try:
        case = MODELS["flux"]
        model = case.build()
        inputs = case.inputs()
        with torch.no_grad():
            ref = model(**inputs)[0]
        plan = xdit_compile.Plan.from_dict({"parallel": {"ulysses": 1, "ring": 1}})
        assert xdit_compile.parallelize(model, plan) is model
        forward = model.forward
        with torch.no_grad():
            out = model(**inputs)[0]
        assert torch.allclose(out, ref, rtol=0, atol=1e-6), (out - ref).abs().max()
        reports = model._xdit_compiler.reports
        assert len(reports) == 1 and reports[0]["sp_size"] == 1
        assert not [a for a in reports[0]["attention"] if a["became"].startswith(PARALLEL_KINDS)]
        assert dist.get_world_size() == 1

        assert xdit_compile.parallelize(model, {"parallel": {"ulysses": 1}}) is model  # equal plan
        assert model.forward is forward
        with torch.no_grad():
            assert torch.equal(model(**inputs)[0], out)
        assert len(model._xdit_compiler.reports) == 1  # not recompiled
        with pytest.raises(ValueError, match="different plan"):
            xdit_compile.parallelize(model, {"compile": {"lowering": "inductor"}})
        assert model.forward is forward and model._xdit_plan == plan
    finally:
        torch._dynamo.reset()
