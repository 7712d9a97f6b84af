#!/usr/bin/env bash
# Build the easy-vqa demo once per precision variant (each build answers the same 60 easy-vqa test
# questions with the fp32 PyTorch reference and with itself, gated), bench each against PyTorch
# eager fp32 in the same run, and write the comparison to benchmarks/results/precision/.
#   bash benchmarks/run_precision.sh            # fp32 w8 w4 int8 fp16 int8img mixed
#   VARIANTS="w4 w8" bash benchmarks/run_precision.sh
set -uo pipefail
cd "$(dirname "$0")/.."
VARIANTS=${VARIANTS:-"fp32 w8 w4 int8 fp16 int8img mixed"}
ROOT=${ROOT:-build/precision}
THREADS=${THREADS:-2}
declare -A PRECISION=([fp32]="" [w8]="decoder=w8" [w4]="decoder=w4" [int8]="int8" [fp16]="fp16"
                      [int8img]="vision=int8,projector=int8" [mixed]="vision=int8,projector=int8,decoder=w4")
for v in $VARIANTS; do
  if [ ! -f "$ROOT/$v/manifest.json" ]; then
    vlm-export demo --out "$ROOT/$v" --force --threads "$THREADS" ${PRECISION[$v]:+--precision ${PRECISION[$v]}} \
      || echo "variant $v failed its gates; its report is in $ROOT/$v.failed/"
  fi
  if [ -f "$ROOT/$v/manifest.json" ]; then
    python benchmarks/run_bench.py "$ROOT/$v" --name "precision/$v" --backends torch,onnxruntime --batch 1 \
      --new-tokens 32 --threads "$THREADS" --iterations 20 --requests 4
  fi
done
python benchmarks/precision_table.py "$ROOT" --variants $VARIANTS
