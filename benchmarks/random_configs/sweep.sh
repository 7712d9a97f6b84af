#!/bin/bash
# Random-configuration sweep: build one random tiny model per seed with `vlm-export build` (parity on) and
# append one line per seed to OUT/results.txt (rc, seconds, what was drawn, the build's last line). A
# model and build that succeed are deleted; failures are kept in OUT for a look. rc 70 is an internal
# error (a bug); rc 1 a refusal or a failed gate, which on random weights may be right.
# lora.py also writes a PEFT adapter beside the model (OUT/model-SEED.lora), which the build merges (--lora).
# SERVE=1: each build that passed is also served through a real tritonserver and asked over HTTP and gRPC
# (serve_check.py), its answer checked against `vlm-export generate`'s; a second line per seed says how that went.
# A NOTE line: the build passed outputs only by parity's float64 check, or greedy tokens at near ties.
#   usage: benchmarks/random_configs/sweep.sh llava|other|exaone4_5|got_ocr2|lora|gemma3|aya_vision|deepseek_vl|paligemma|idefics3|internvl|qwen2_vl|qwen3_vl|qwen3_5|lfm3_vl|minicpm_v|glm4v|paddleocr_vl|cosmos3_edge|mistral3|lighton_ocr|llava_next|llava_onevision|hunyuan_vl|gemma4 FIRST_SEED LAST_SEED OUT [build options...]
#   e.g.:  benchmarks/random_configs/sweep.sh other 100 140 /tmp/sweep --precision fp16
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
maker=$here/$1.py; first=$2; last=$3; out=$4; shift 4
mkdir -p "$out"
for seed in $(seq "$first" "$last"); do
  model=$out/model-$seed; build=$out/build-$seed
  rm -rf "$model" "$model.lora" "$build"
  "$root/.venv/bin/python" "$maker" "$seed" "$model" > "$model.drawn" 2>"$model.make.log"
  made=$?; drawn=$(tail -1 "$model.drawn"); rm -f "$model.drawn"
  lora=(); [ -d "$model.lora" ] && lora=(--lora "$model.lora")
  if [ $made -ne 0 ] || [ ! -f "$model/config.json" ]; then
    echo "$seed MAKEFAIL $drawn | $(tail -1 "$model.make.log")" >> "$out/results.txt"; continue
  fi
  start=$(date +%s)
  timeout 1200 "$root/.venv/bin/vlm-export" build "$model" --out "$build" --parity-tokens 16 "${lora[@]}" "$@" > "$build.log" 2>&1
  rc=$?
  echo "$seed rc=$rc $(( $(date +%s) - start ))s $* $drawn | $(grep -v '^\s*$' "$build.log" | tail -1 | cut -c1-400)" \
    >> "$out/results.txt"
  # a build that passed only by parity's float64 check or at near ties says so on its parity line
  notes=$(grep -o "; [0-9]* fp32 output(s) only by the float64 check.*\|; greedy tokens parted at .*" "$build.log" | head -2 | tr '\n' ' ')
  [ -n "$notes" ] && echo "$seed NOTE $notes" | cut -c1-600 >> "$out/results.txt"
  if [ $rc -eq 0 ] && [ "${SERVE:-0}" = 1 ]; then
    served=$("$root/.venv/bin/python" "$here/serve_check.py" "$build" "$out/serve-$seed" $(( 18000 + (seed % 300) * 3 )) 2>&1 | tail -1)
    echo "$seed $served" >> "$out/results.txt"
    case "$served" in "SERVE OK"*) rc=0; rm -rf "$out/serve-$seed";; *) rc=1;; esac
  fi
  [ $rc -eq 0 ] && rm -rf "$model" "$model.lora" "$build" "$model.make.log" "$build.log"
done
