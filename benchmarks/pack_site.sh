#!/bin/bash
# Packs the wheels in .whl/ (diffusers, xfuser, yunchang, distvae, importlib_metadata) installed, without bytecode, as
# the ignored .whl.tar.xz that benchmarks/gpu_site.sh unpacks on the GPU machine: carry [".whl.tar.xz", ".fa"].
set -euo pipefail
d=$(mktemp -d)
python3 -m pip install -q --no-deps --no-compile --target "$d" .whl/*.whl
find "$d" -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$d" . | xz -T0 -9 > .whl.tar.xz
rm -rf "$d"; ls -la .whl.tar.xz
