import sys, os; sys.path.insert(0, "tests")
import torch, torch.distributed as dist, xdit_compile
from models import MODELS
names, par = sys.argv[1].split(","), eval(sys.argv[2]); low = sys.argv[3] if len(sys.argv) > 3 else "eager"
dist.init_process_group("gloo")
for name in names:
    torch._dynamo.reset()
    case = MODELS[name]; m = case.build(); inp = case.inputs(batch=2)
    with torch.no_grad(): ref = m(**inp)[0]
    xdit_compile.parallelize(m, {"parallel": par, "compile": {"lowering": low}})
    with torch.no_grad(): out = m(**inp)[0]
    print(dist.get_rank(), name, ((out-ref).norm()/ref.norm()).item(), m._xdit_compiler.reports[0]["cfg_batch"])
    if dist.get_rank() == 0 and os.environ.get("EXPLAIN"): print(xdit_compile.explain(m))
dist.destroy_process_group()
