#!/usr/bin/env bash
# The device checks of a machine with a GPU, in one short run (about 10 minutes at most):
#   1. every shared pallet's asymptotic hypotests, each pallet in one group on the GPU, against one
#      patch at a time on the CPU (benchmarks/groups.py);
#   2. the upper limits of 32 1Lbb patches, their searches in lockstep on the GPU, against one patch
#      at a time on the CPU (benchmarks/groups.py --limits);
#   3. 10^6 toys of each hypothesis of 1Lbb C1N2_Wh_hbb_700_150 on the GPU, and the agreement with
#      the CPU on shared toys (benchmarks/gpu_toys.py).
# It needs jax (with its GPU plugin), numpy and scipy, pyhf (where it is missing, the wheels that
# benchmarks/gpu-wheels.sh put in .wheels/ are installed into a folder of their own first), and the
# pallets in $PYHF_DIST_DATA (default: ../shared/data, else .gpu-data/ in the checkout, a copy of
# that folder that git ignores).
# Figures go to $OUT (default benchmarks/output/gpu/); the log says which device ran them.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/output/gpu}"
mkdir -p "$out"
if [ -z "${PYHF_DIST_DATA:-}" ]; then
  if [ -d ../shared/data ]; then PYHF_DIST_DATA="$(cd ../shared/data && pwd)"; else PYHF_DIST_DATA="$(pwd)/.gpu-data"; fi
fi
export PYHF_DIST_DATA PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
if ! "$python" -c "import pyhf" 2>/dev/null && [ -d .wheels ]; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/pyhf-dist-site .wheels/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/pyhf-dist-site"
fi
toys="${TOYS:-1000000}" batches="${BATCHES:-8192,32768}"  # fewer and smaller for a try on a CPU
{ nvidia-smi -L 2>/dev/null || true; "$python" -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$out/device.txt"
timeout 240 "$python" benchmarks/groups.py --pallets 1Lbb,stau-combined,stau-lowMass,stau-highMass,3L-eRJR \
  --group 1000 2>&1 | tee "$out/groups.txt"
timeout 100 "$python" benchmarks/groups.py --pallets 1Lbb --limits 32 2>&1 | tee "$out/limits.txt"
timeout 220 "$python" benchmarks/gpu_toys.py "$PYHF_DIST_DATA/1Lbb-likelihoods-hepdata.tar.gz" --ntoys "$toys" \
  --batches "$batches" --cpu-toys 200 --budget 130 2>&1 | tee "$out/toys.txt"
