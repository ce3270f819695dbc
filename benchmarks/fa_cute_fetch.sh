# Builds the ignored .fa/ folder that benchmarks/fa_cute_env.sh unpacks on the GPU machine (needs the package index).
set -euo pipefail
d=$(mktemp -d)
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$d" \
  nvidia-cutlass-dsl==4.1.0 "cuda-python==12.9.*" "cuda-bindings==12.9.*"
# the sdist itself (pip download would try to build it): only its pure-Python flash_attn/cute is used
curl -sSL -o "$d"/flash_attn-2.8.3.post2.tar.gz \
  "$(curl -s https://pypi.org/simple/flash-attn/ | grep -o 'https://[^"#]*flash_attn-2.8.3.post2.tar.gz' | head -1)"
rm -rf .fa && mkdir -p .fa/src/flash_attn "$d/cdsl"
(cd "$d/cdsl" && unzip -q "$d"/nvidia_cutlass_dsl-4.1.0-*.whl)
tar cf - -C "$d/cdsl" . | xz -T0 -6 > .fa/cdsl.tar.xz
cp "$d"/cuda_python-*.whl "$d"/cuda_bindings-*.whl .fa/
tar xzf "$d"/flash_attn-2.8.3.post2.tar.gz -C "$d" flash_attn-2.8.3.post2/flash_attn/cute
cp -r "$d"/flash_attn-2.8.3.post2/flash_attn/cute .fa/src/flash_attn/
echo '"""flash_attn without its compiled CUDA extension: only flash_attn.cute (CuTe DSL, pure Python) is used."""' > .fa/src/flash_attn/__init__.py
du -sh .fa
