#!/usr/bin/env bash
# Serve ERNIE-4.5 MoE with vLLM's OpenAI-compatible server and the recommended flags.
#   bash examples/serve.sh /weights/ERNIE-4.5-21B-A3B-PT [extra vllm serve flags]
# Environment: TP (tensor parallel size, default 1), PORT (default 8000), MAX_MODEL_LEN (32768).
# A msModelSlim W8A8 directory needs no flag; --quantization ernie-w8a8-dynamic quantizes BF16.
set -euo pipefail
model=${1:?usage: bash examples/serve.sh MODEL [vllm serve flags]}
shift
# On vLLM's CPU backend: compute on every core (vLLM keeps one for its front end otherwise).
export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
exec vllm serve "$model" \
  --tensor-parallel-size "${TP:-1}" \
  --port "${PORT:-8000}" \
  --max-model-len "${MAX_MODEL_LEN:-32768}" \
  --served-model-name ernie-4.5-moe \
  "$@"
