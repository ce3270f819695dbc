import sys, os; sys.path.insert(0, "tests")
import torch, torch.distributed as dist, xdit_compile
from diffusers import DiTTransformer2DModel
from xdit_compile.builtin import digits
from xdit_compile.pipelines.digits import DigitsPipeline
par = eval(sys.argv[1])
dist.init_process_group("gloo")
torch.manual_seed(0)
tf = digits.disable_label_dropout(DiTTransformer2DModel(**digits.model_config())).eval()
# adaLN-zero init makes outputs zero; randomise all params a bit
with torch.no_grad():
    for p in tf.parameters(): p.add_(torch.randn_like(p) * 0.02)
pipe = DigitsPipeline(tf)
kw = dict(prompt=[str(i % 10) for i in range(5)], num_inference_steps=3, guidance_scale=3.0)
gens = lambda: [torch.Generator().manual_seed(i) for i in range(5)]
ref = pipe(generator=gens(), **kw).images
xdit_compile.parallelize(pipe, {"parallel": par})
out = pipe(generator=gens(), **kw).images
print(dist.get_rank(), tuple(out.shape), ((out - ref).norm() / ref.norm()).item())
if dist.get_rank()==0: print(xdit_compile.explain(pipe))
