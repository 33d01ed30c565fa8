#!/usr/bin/env bash
# MindIE-style launcher: bash examples/run_pa.sh [weight_path] [extra run_pa.py arguments]
# Environment: INPUT_TEXT, MAX_OUTPUT_LENGTH, TP (world size), EXTRA_PARAM (e.g. --no-is_chat_model).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
weights=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then weights=(--model_path "$1"); shift; fi
# shellcheck disable=SC2086
exec python "$here/run_pa.py" "${weights[@]}" \
  --input_texts "${INPUT_TEXT:-What's Deep Learning?}" \
  --max_output_length "${MAX_OUTPUT_LENGTH:-20}" \
  --tp "${TP:-1}" ${EXTRA_PARAM:-} "$@"
