#!/bin/sh
# The GPU figures of the evaluation issue in one run, on a machine with an NVIDIA GPU and no network:
# batched whole-video ME-rPPG throughput at B = 1, 16, 64, 256 recordings per device call in float32 and
# bfloat16 (bench_model.py), the training step's device memory and frames/s on 32 sequences of 1600 frames
# (bench_train.py, against 160 frames), PhysMamba's batched throughput at b = 1, 8, 32 chunks of 128 frames per
# device call (bench_physmamba.py), and the model parity tests on that GPU. Nothing is installed: the machine's
# Python must bring JAX with CUDA, h5py and pytest; the published weights come in .gpu-kit/ (`make gpu-kit`
# on a machine with this project installed, then copy .gpu-kit along with the checkout).
# Usage, from the repository root:  sh bench/gpu_check.sh OUT_DIR   (exit status 1 if a step failed)
set -u
out=${1:?usage: sh bench/gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
export PULSEPIPE_WEIGHTS_DIR="$PWD/.gpu-kit/weights" PYTHONUNBUFFERED=1
mkdir -p "$out"
status=0
step() {  # step NAME COMMAND...: its output into OUT_DIR/NAME.log and here; a failure is remembered
    name=$1; shift
    "$@" > "$out/$name.log" 2>&1 || { echo "$name: FAILED" >> "$out/$name.log"; status=1; }
    cat "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
step jax "$py" -c 'import jax; print(jax.__version__, jax.devices())'
"$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu" and "JAX sees no GPU")' \
    || [ -n "${ALLOW_CPU:-}" ] || exit 1
step model-gpu "$py" bench/bench_model.py --batch-sizes ${BATCH_SIZES:-1 16 64 256} \
    --precisions float32 bfloat16 --out "$out/model-gpu.json"
# Training: train_step on B = 32 sequences of 160 and 1600 frames (device peak memory, frames/s); no Keras here.
step train-gpu "$py" bench/bench_train.py --batch ${TRAIN_BATCH:-32} --lengths ${TRAIN_LENGTHS:-160 1600} \
    --repeats 3 --out "$out/train-gpu.json"
# PhysMamba: b 128-frame chunks per device call (frames/s, compile time); no whole-video or Keras runs here.
step physmamba-gpu "$py" bench/bench_physmamba.py --minutes --batch-sizes ${PHYSMAMBA_BATCH_SIZES:-1 8 32} \
    --out "$out/physmamba-gpu.json"
step parity-gpu "$py" -m pytest -p no:cacheprovider tests/test_model_parity.py tests/test_physmamba.py
exit $status
