"""The built-in digits pipeline under cfg / data / cfg x ulysses equals the one-process pipeline; `run` errors."""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from xdit_compile.plan import Plan

PLANS = {2: [{"cfg": 2}, {"data": 2}], 4: [{"cfg": 2, "ulysses": 2}, {"data": 2, "cfg": 2}]}


def _pipelines(rank, world, plans):
    import xdit_compile
    from xdit_compile.builtin.digits import load_transformer
    from xdit_compile.pipelines.digits import DigitsPipeline

    kw = dict(prompt=[str(i) for i in range(6)], num_inference_steps=4, guidance_scale=4.0)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]  # noqa: E731
    ref = DigitsPipeline(load_transformer())(generator=gens(), **kw).images
    out = {}
    for par in plans:
        torch._dynamo.reset()
        pipe = DigitsPipeline(load_transformer())
        xdit_compile.parallelize(pipe, {"parallel": par})
        img = pipe(generator=gens(), **kw).images
        rep = pipe.transformer._xdit_compiler.reports
        out[str(par)] = (((img - ref).norm() / ref.norm()).item(), rep[0]["cfg_batch"] if rep else None,
                         sum(a.get("bytes", 0) for r in rep for a in r["attention"]))
    return out


@pytest.fixture(scope="module")
def results():
    return {w: run_distributed(_pipelines, w, plans) for w, plans in PLANS.items()}


@pytest.mark.parametrize("world,par", [(w, p) for w, ps in PLANS.items() for p in ps], ids=str)
def test_digits_pipeline_matches_one_process(results, world, par):
    for rank_result in results[world]:
        err, cfg_batch, attn_bytes = rank_result[str(par)]
        assert err < 1e-4
        if par.get("cfg", 1) > 1:
            # 6 images (split over the data groups) x [cond, uncond], that batch split over the cfg axis
            assert cfg_batch == [12 // par.get("data", 1)]
        if par.get("ulysses", 1) > 1:
            assert attn_bytes > 0


def test_run_errors(tmp_path):
    from xdit_compile.pipelines.run import load_pipeline, run

    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'"):
        load_pipeline("builtin:nope")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="run.prompt has 2 entries but run.num_images is 3"):
        Plan.from_dict({"run": {"prompt": ["1", "2"], "num_images": 3}})
    plan = Plan.from_dict({"model": "builtin:digits", "parallel": {"cfg": 2}, "run": {"guidance_scale": 1.0}})
    with pytest.raises(ValueError, match="guidance_scale=1.0 turns it off"):
        run(plan)


def test_load_pipeline_from_a_local_folder(tmp_path):
    """`model = "<folder>"` loads a saved diffusers pipeline (real from_pretrained, no download)."""
    from pipelines import build

    from xdit_compile.pipelines.run import load_pipeline

    pipe = build("pixart")
    pipe.save_pretrained(tmp_path / "pixart")
    loaded = load_pipeline(str(tmp_path / "pixart"))
    assert type(loaded).__name__ == type(pipe).__name__
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), loaded.transformer.state_dict().items()):
        assert torch.equal(a, b), name
