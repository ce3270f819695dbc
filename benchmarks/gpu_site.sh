# Sourced by the gpu_*.sh scripts: diffusers and the peers' pure-Python packages into /tmp/site, from the wheels in
# .whl/ or, where the call carries it instead, from .whl.tar.xz: the same packages installed and xz-packed, a third
# of the wheels' size (`bash benchmarks/pack_site.sh`), so that they and .fa/ fit in the 64 MiB a device call carries.
if [ -f .whl.tar.xz ]; then mkdir -p /tmp/site && tar xJf .whl.tar.xz -C /tmp/site
else python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
