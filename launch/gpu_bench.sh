#!/usr/bin/env bash
# MFU of the EmoLA-7B LoRA train step on one GPU: bf16 compute, remat full, sequence 2048, the
# paper's recipe (configs/emola_lora.py: LoRA r128 on the decoder, both projectors train), random
# weights and a synthetic batch (speed does not depend on the values). Installs nothing.
#
#   launch/gpu_bench.sh                       batch 8, 5 timed steps, JSON to bench_gpu_<time>.json
#   BATCH=16 launch/gpu_bench.sh --steps=10   environment and extra emola_jax.bench flags
#
# Prints the matmul peak (measured, and the published one for known GPUs: A100, H100, H200), the
# step time, tokens/s and MFU. The interpreter is $EMOLA_PYTHON, else .venv/bin/python when
# present, else python3; it needs JAX with CUDA:  pip install -U "jax[cuda12]"
#
# Environment: BATCH (8), SEQ_LEN (2048), STEPS (5), CONFIG (configs/emola_lora.py),
# OUT (JSON path), DEVICE (gpu; cpu runs the same command on the CPU, for a smoke test with a
# small CONFIG).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${EMOLA_PYTHON:-}" ]]; then
  python="$EMOLA_PYTHON"
elif [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi

batch="${BATCH:-8}"
seq_len="${SEQ_LEN:-2048}"
steps="${STEPS:-5}"
config="${CONFIG:-configs/emola_lora.py}"
device="${DEVICE:-gpu}"
out="${OUT:-bench_gpu_$(date -u +%Y%m%dT%H%M%SZ).json}"

# The whole GPU for one process; no preallocation slack is needed by anything else here.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"

exec "$python" -m emola_jax.bench --device="$device" --config="$config" --parts=peak,train \
  --notorch --batch="$batch" --seq_len="$seq_len" --steps="$steps" --json="$out" "$@"
