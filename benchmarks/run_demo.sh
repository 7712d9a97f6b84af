#!/usr/bin/env bash
# Bench the easy-vqa demo (SmolLM2-135M + trained vision tower) and record it in
# benchmarks/results/demo/. Builds build/demo first if it is not there (`vlm-export demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build/demo}
if [ ! -f "$BUILD/manifest.json" ]; then
  vlm-export demo --out "$BUILD" --eval-questions 0
fi
python benchmarks/run_bench.py "$BUILD" --name demo "$@"
