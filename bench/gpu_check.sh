#!/bin/sh
# The GPU figures of issue #5 in one run on a lent GPU machine (see ../.library/device): batched whole-video
# ME-rPPG throughput at B = 1, 16, 64, 256 recordings per device call in float32 and bfloat16, and the model
# parity tests on that GPU. That machine reaches no network, so nothing is installed there: its python3
# brings JAX with CUDA, h5py and pytest; the published weights travel in .gpu-kit/ (`make gpu-kit` here,
# then carry .gpu-kit). Usage, from the repository root:  sh bench/gpu_check.sh OUT_DIR
set -eu
out=${1:?usage: sh bench/gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
export PULSEPIPE_WEIGHTS_DIR="$PWD/.gpu-kit/weights" PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
"$py" -c 'import jax; print(jax.__version__, jax.devices())' | tee "$out/jax.txt"
"$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu" and "JAX sees no GPU")' || [ -n "${ALLOW_CPU:-}" ]
"$py" bench/bench_model.py --batch-sizes ${BATCH_SIZES:-1 16 64 256} --precisions float32 bfloat16 \
    --out "$out/model-gpu.json" 2>&1 | tee "$out/model-gpu.log"
"$py" -m pytest -p no:cacheprovider tests/test_model_parity.py 2>&1 | tee "$out/parity-gpu.log"
