#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu.sh installs on a GPU machine that has jax, numpy and
# scipy but not pyhf (and cannot fetch packages): pyhf and what it needs beyond those, for that
# machine's Python (3.12 by default: PYTHON_VERSION=3.11 ...). They go to .wheels/ in the
# checkout (git ignores it); carry that folder to the machine with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .wheels \
  pyhf==0.7.6 jsonpatch==1.48 jsonpointer==3.12 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 loky==3.7.0
ls .wheels
