"""Bad plans through the public entry points, in 2 gloo workers: a clear error on every rank, no hang.

The workers catch the exception and return ``(type name, message)``: a raising rank would restart the pool.
Every call has a short timeout, so a rank stuck in a collective fails the test instead of hanging it.
"""

from __future__ import annotations

import pytest
from dist_utils import run_distributed

TIMEOUT_S = 120


def _parallelize_error(rank, world_size, plan):
    """parallelize() a tiny model with ``plan``; the exception it raised, or None."""
    import torch

    import xdit_compile

    model = torch.nn.Linear(4, 4)
    try:
        xdit_compile.parallelize(model, plan)
        model(torch.randn(2, 3, 4))  # an error at compile time (first call) counts too
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e), hasattr(model, "_xdit_plan")
    return None


def _errors(plan):
    results = run_distributed(_parallelize_error, 2, plan, timeout=TIMEOUT_S)
    assert all(r is not None for r in results), f"no error for {plan}: {results}"
    assert results[0] == results[1], f"ranks disagree: {results}"  # the same error on every rank
    kind, message, applied = results[0]
    assert not applied, "a rejected plan must leave the model untouched"
    return kind, message


def test_degrees_product_not_world_size():
    kind, message = _errors({"parallel": {"ulysses": 4}})
    assert kind == "ValueError"
    assert "ulysses=4" in message and "= 4 but the world size is 2" in message, message


def test_unknown_key_suggests_spelling():
    kind, message = _errors({"parallel": {"ulyses": 2}})
    assert kind == "ValueError"
    assert "'parallel.ulyses'" in message and "did you mean 'ulysses'" in message, message


def test_unknown_section():
    kind, message = _errors({"paralel": {"ulysses": 2}})
    assert kind == "ValueError"
    assert "'paralel'" in message and "did you mean 'parallel'" in message, message


@pytest.mark.parametrize("value", [-2, 0, 2.0, True, "2"])
def test_bad_degree(value):
    kind, message = _errors({"parallel": {"ulysses": value}})
    assert kind == "ValueError"
    assert "parallel.ulysses must be an int >= 1" in message and "got" in message, message


def test_bad_lowering():
    kind, message = _errors({"parallel": {"ulysses": 2}, "compile": {"lowering": "inductr"}})
    assert kind == "ValueError"
    assert "compile.lowering" in message and "did you mean 'inductor'" in message, message


# --- a model with no attention at all -----------------------------------------------------------------


def _no_attention(rank, world_size):
    import warnings

    import torch

    import xdit_compile

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        ref = model(x)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            xdit_compile.parallelize(model, {"parallel": {"ulysses": 2}})
            with torch.no_grad():
                out = model(x)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    reports = model._xdit_compiler.reports
    return {
        "equal": torch.equal(out, ref),
        "attention": [a for r in reports for a in r["attention"]],
        "events": [e["kind"] for r in reports for e in r["events"]],
        "sp_sizes": [r["sp_size"] for r in reports],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    }


def test_model_without_attention_runs_unsharded():
    """Nothing to shard: the model runs whole on every rank (each rank computes the full output)."""
    results = run_distributed(_no_attention, 2, timeout=TIMEOUT_S)
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r['error']}"
        assert r["equal"], f"rank {rank}: output differs from the unparallelized model"
        assert r["attention"] == [] and r["events"] == [] and r["sp_sizes"] == [2], r


# --- the dynamo backend entry point -------------------------------------------------------------------


def _backend_option_error(rank, world_size, options):
    import torch

    torch._dynamo.reset()
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="xdit", options=options)
    try:
        compiled(torch.randn(2, 4))
    except Exception as e:  # noqa: BLE001 - dynamo wraps the backend's error in BackendCompilerFailed
        return type(e).__name__, str(e)
    return None


def test_backend_unknown_option_raises():
    results = run_distributed(
        _backend_option_error, 2, {"plan": {"parallel": {"ulysses": 2}}, "bogus": 1}, timeout=TIMEOUT_S
    )
    for r in results:
        assert r is not None, "torch.compile(backend='xdit') accepted an unknown option"
        assert "unknown xdit backend option(s) ['bogus']" in r[1], r


def test_backend_bad_plan_raises():
    results = run_distributed(_backend_option_error, 2, {"plan": {"parallel": {"ulysses": 4}}}, timeout=TIMEOUT_S)
    for r in results:
        assert r is not None, "torch.compile(backend='xdit') accepted ulysses=4 on 2 ranks"
        assert "= 4 but the world size is 2" in r[1], r


def test_pool_survives():
    """The errors above were all caught in the workers: the same pool still runs a collective."""
    assert run_distributed(_sum_ranks, 2, timeout=TIMEOUT_S) == [1.0, 1.0]


def _sum_ranks(rank, world_size):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()
