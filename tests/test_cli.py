"""The xdit-compile CLI (as a subprocess: exit codes and output are what a user sees) and models_registry."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xdit_compile import models_registry

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "examples" / "ulysses2.toml"


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    exe = shutil.which("xdit-compile")
    cmd = [exe] if exe else [sys.executable, "-m", "xdit_compile.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_explain_ulysses2_flux_tiny():
    r = _cli("explain", PLAN, "--model", "flux-tiny", "--nproc", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ulysses" in r.stdout
    assert "max relative error vs 1-process reference" in r.stdout
    err = float(r.stdout.split("max relative error vs 1-process reference: ")[1].split()[0])
    assert err < 1e-5, r.stdout


def test_bad_plan_key_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[parallel]\nulyses = 2\n")
    r = _cli("explain", bad, "--model", "flux-tiny", "--nproc", "2")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ulyses" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unknown_model_exits_2(capsys):
    from xdit_compile.cli import main  # in process (no torch import to pay again): main's return is the status

    assert main(["explain", str(PLAN), "--model", "no-such-model", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "flux-tiny" in err and len(err.strip().splitlines()) == 1, err


def test_missing_model_and_missing_processes_exit_2(tmp_path, capsys):
    from xdit_compile.cli import main

    plan = tmp_path / "p.yaml"
    plan.write_text("parallel: {ring: 2}\n")
    assert main(["explain", str(plan)]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["explain", str(plan), "--model", "wan-tiny"]) == 2  # needs 2 processes, no --nproc
    assert "--nproc 2" in capsys.readouterr().err


# --- models_registry (in process, no distributed) -----------------------------------------------------


def test_registry_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="flux-tiny.*wan-tiny.*pixart-tiny.*flux-dev"):
        models_registry.get("flux-giant")


def test_registry_sizes():
    assert models_registry.get("flux-dev").inputs(height=512, width=768, device="meta")[
        "hidden_states"].shape == (1, 32 * 48, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        models_registry.get("flux-tiny").check_size(60, 96)


@pytest.mark.parametrize("name", ["flux-tiny", "pixart-tiny"])
def test_registry_local_folder_roundtrip(tmp_path, name):
    spec = models_registry.get(name)
    model = spec.build()
    model.save_pretrained(tmp_path / "transformer")  # a pipeline-shaped folder: resolved to transformer/
    loaded, lspec = models_registry.load(str(tmp_path))
    assert lspec.cls_name == spec.cls_name and type(loaded) is type(model)
    kw = spec.inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw)[0], model(**kw)[0])


def test_registry_folder_without_builder(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="no input builder for UNet2DModel"):
        models_registry.resolve(str(tmp_path))
