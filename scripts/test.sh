#!/usr/bin/env bash
# The test command: builds the environments from scratch (or reuses them) and runs the suite twice,
# with the latest releases and with Scope's pinned versions. No GPU, no network to model hubs needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A CPU-capable torch for the test machines; set TORCH_SPEC to test against another build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# Scope 0.2.4's locked versions of the libraries this package shares with it.
SCOPE_PINS="diffusers==0.36.0 transformers==4.57.5 peft==0.18.1 huggingface_hub==0.36.0 accelerate==1.12.0 compel==2.1.1"

make_env() {  # make_env DIR [extra pip specs...]
  local dir=$1; shift
  if [ ! -x "$dir/bin/python" ]; then "$PYTHON" -m venv "$dir"; fi
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -c "import torch" 2>/dev/null || "$dir/bin/python" -m pip install -q "$TORCH_SPEC"
  "$dir/bin/python" -m pip install -q -e ".[test]" "$@"
  # Only for the real CLIP BPE vocabulary file of the tiny test models (its deps are not needed).
  "$dir/bin/python" -m pip install -q --no-deps open_clip_torch
}

run_suite() {  # run_suite DIR LABEL [pytest args...]
  echo "== tests with $2 =="
  "$1/bin/python" -c "import diffusers, transformers, peft, compel, huggingface_hub as h; print('diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| huggingface_hub', h.__version__)"
  # Everything a pass caches or writes (tiny models, inductor's code, temporary folders) stays inside
  # the checkout, in a folder of its own: the two passes run at the same time.
  local cache="$PWD/.cache-test/${1#.}"
  mkdir -p "$cache"
  HF_HUB_OFFLINE=1 SCOPE_STREAMDIFFUSION_CACHE="$cache" TORCHINDUCTOR_CACHE_DIR="$cache/inductor" \
    "$1/bin/python" -m pytest -q -p no:cacheprovider --basetemp="$cache/tmp" "${@:3}"
}

# The two environments take ~4 GB and the suite ~0.3 GB more: say so up front when the disk is short
# (a full disk shows up later as an unrelated-looking I/O error inside some test).
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt 5000 ]; then
  echo "warning: only ${free_mb} MB free on this disk; the tests need about 5,000 MB (two environments)." >&2
fi

make_env .venv-test
# Triton (~1 GB installed; a version known to work) for the GroupNorm kernels' test, run by its CPU
# interpreter; the first pass only.
"./.venv-test/bin/python" -c "import triton" 2>/dev/null || "./.venv-test/bin/python" -m pip install -q "triton==3.9.0" \
  || echo "warning: triton did not install; the GroupNorm kernels' interpreter test will be skipped." >&2
pins_log=.cache-test/scope-pins.log
if [ "${SKIP_SCOPE_PINS:-0}" != "1" ]; then
  # The second pass runs beside the first (each test process uses one thread; the suite's machines
  # have two cores), into a log printed when both are done. The 2,000-frame soak measures our own
  # code, not the libraries: it runs in the first pass only.
  mkdir -p .cache-test
  ( make_env .venv-test-scope-pins $SCOPE_PINS
    run_suite .venv-test-scope-pins "Scope's pinned versions" -m "not slow" "$@" ) > "$pins_log" 2>&1 &
  pins=$!
  # Interrupted or failed early: the second pass stops too (a background job ignores Ctrl-C).
  trap 'if [ -n "${pins:-}" ]; then pkill -TERM -P "$pins" 2>/dev/null; kill "$pins" 2>/dev/null; fi' EXIT
  trap 'exit 130' INT TERM
fi
latest=0
run_suite .venv-test "the latest releases" "$@" || latest=$?
pinned=0
if [ -n "${pins:-}" ]; then
  wait "$pins" || pinned=$?
  pins=
  cat "$pins_log"
fi
if [ "$latest" != 0 ] || [ "$pinned" != 0 ]; then
  echo "FAILED: latest releases exit $latest, Scope's pins exit $pinned" >&2
  exit 1
fi
