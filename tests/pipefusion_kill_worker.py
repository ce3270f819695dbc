"""Worker of test_pipefusion.test_killed_stage_does_not_hang (run as a script, torchrun-style env).

Rank 1 (the last pipefusion stage) exits with code 17 at the start of its third call; rank 0 must raise
(peer gone, or the XDIT_TIMEOUT_S collective timeout) and exit non-zero instead of waiting forever."""
import os
import sys
import traceback

import torch

import xdit_compile
from models import MODELS


def main():
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    case = MODELS["flux"]
    model = case.build()
    inputs = case.inputs()
    xdit_compile.parallelize(model, {"parallel": {"pipefusion": 2}, "pipefusion": {"warmup_steps": 1}})
    with torch.no_grad():
        model(**inputs)                      # compiles; a full step
        runner = model._xdit_compiler.pipefusion_runners[0]
        if rank == 1:
            patched = runner._patched

            def die(*a):
                if runner.calls == 3:
                    os._exit(17)
                return patched(*a)
            runner._patched = die
        try:
            for _ in range(5):
                model(**inputs)
        except Exception as e:  # noqa: BLE001
            print(f"survivor saw {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            traceback.print_exc()
            os._exit(1)
    print("finished without error", flush=True)


if __name__ == "__main__":
    sys.exit(main())
