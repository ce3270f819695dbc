# Source on the GPU machine (bash): makes flash_attn.cute (the CuTe-DSL FlashAttention kernels of the flash-attn
# 2.8.3.post2 sdist, pure Python) importable, from the ignored .fa/ folder carried with the call:
#   .fa/cdsl.tar.xz      nvidia-cutlass-dsl 4.1.0 (the version flash_attn/cute names), unpacked wheel, xz'd to fit
#                        the carry limit
#   .fa/*.whl            cuda-python / cuda-bindings 12.9 (cutlass-dsl 4.1 asks for cuda-python < 13)
#   .fa/src/flash_attn/  flash_attn/cute from the sdist and an empty __init__.py (no compiled extension)
# Rebuild .fa/ here with benchmarks/fa_cute_fetch.sh.
FA_ROOT=${FA_ROOT:-/tmp/fa}
if [ ! -d "$FA_ROOT/site/nvidia_cutlass_dsl" ]; then
  mkdir -p "$FA_ROOT/site" && tar xJf .fa/cdsl.tar.xz -C "$FA_ROOT/site" &&
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$FA_ROOT/site" .fa/*.whl
fi
# XDIT_FA_PATHS: what this adds, so bench.py can leave it out of the peers' runs (xfuser takes an importable
# flash_attn for the flash-attn package and ran FLUX 1024² at 160 ms instead of 86 with it on the path)
export XDIT_FA_PATHS="$FA_ROOT/site/nvidia_cutlass_dsl/python_packages:$FA_ROOT/site:$PWD/.fa/src"
export PYTHONPATH="$XDIT_FA_PATHS${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$FA_ROOT/site/nvidia_cutlass_dsl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
