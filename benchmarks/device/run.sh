#!/usr/bin/env bash
# The GPU checks of benchmarks/device/, as one prepared run (at most 8 minutes): the
# Pythia-31M-shaped GPT-NeoX with the paper's workload, bfloat16 and float32. Tables are
# written to $OUT (default ./out). Extra arguments go to lm_gpu.py (e.g. --k 20, --tiny).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT="${OUT:-./out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1 || true
timeout 480 python benchmarks/device/lm_gpu.py "$@" 2>&1 | tee "$OUT/lm_gpu.log"
