#!/usr/bin/env bash
# Make a random-weight LLaVA (realistic: CLIP ViT-B/16@224 + SmolLM2-135M-shaped decoder; or
# tiny: the tests' model), build it, bench it, and record the results in benchmarks/results/<kind>/.
#   benchmarks/run_random.sh realistic [run_bench.py options...]
# Work folders go to $WORK (default /tmp/vlm-bench); the realistic build exports ~890 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${1:?usage: run_random.sh realistic|tiny [run_bench.py options]}
shift
WORK=${WORK:-/tmp/vlm-bench}
mkdir -p "$WORK"
[ -f "$WORK/model-$KIND/config.json" ] || python benchmarks/make_model.py "$KIND" "$WORK/model-$KIND"
[ -f "$WORK/build-$KIND/manifest.json" ] || vlm-export build "$WORK/model-$KIND" --out "$WORK/build-$KIND" \
  --max-images 1 --max-sequence 1024 --force
python benchmarks/run_bench.py "$WORK/build-$KIND" --name "$KIND" "$@"
