#!/usr/bin/env bash
# The main job: set up .venv and stylise the built-in moving test pattern into out/demo.mp4.
# With a CUDA GPU it uses the default model (stabilityai/sd-turbo + TAESD, downloaded on first use);
# without one, the package's own tiny random-weight model (offline; its output is noise by nature).
# MODEL=<id or folder> picks another model; extra arguments go to `scope-streamdiffusion run`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e .

SIZE=()
if [ -z "${MODEL:-}" ]; then
  if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    MODEL=stabilityai/sd-turbo
  else
    MODEL=tiny-random
  fi
fi
if [[ "$MODEL" == tiny-random* ]]; then
  # The tiny model uses the real CLIP vocabulary, shipped in open_clip_torch (its deps aren't needed).
  .venv/bin/python -m pip install -q --no-deps open_clip_torch
  SIZE=(--width 128 --height 128)
fi
mkdir -p out
.venv/bin/scope-streamdiffusion run --input testpattern --model "$MODEL" "${SIZE[@]}" \
  --prompt "a watercolor painting of a lighthouse at dusk" --output out/demo.mp4 "$@"
