#!/usr/bin/env bash
# The GPU benchmark runs behind BENCHMARKS.md, on a bare H200 machine (python3 with torch, no
# diffusers/compel/pydantic: installed from wheels in .whl/ when missing, see BENCHMARKS.md).
#   bash scripts/bench-h200.sh 1   # SD-Turbo img2img/txt2img + SD1.5 LCM 4-step, checks, warm restart
#   bash scripts/bench-h200.sh 2   # SDXL-Turbo 1024² and 512²
#   bash scripts/bench-h200.sh 3   # compile variants (inductor options, reduce-overhead) on SD-Turbo img2img
#   bash scripts/bench-h200.sh 4   # the default compile (frozen weights) with correctness checks
# Results: $OUT (or ./bench-out) *.json and *.log.
set -uo pipefail
part=${1:-1}
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export OUT
if [ -d .whl ] && ! python3 -c 'import diffusers, compel, pydantic' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi-$part.txt" 2>&1
bench() {
  local name=$1 start=$SECONDS; shift; echo "=== $name: $*"
  python3 -m scope_streamdiffusion.bench --random-weights --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"; grep -E "^(sd|ratios|check|WARNING|ERROR)" "$OUT/$name.log" | cut -c1-400
}
if [ "$part" = 1 ]; then
  bench sdturbo --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,cudagraph,compile --frames 150 --warmup 5 --check --profile
  # A restart: the same compile with inductor's on-disk cache warm.
  bench sdturbo-warm --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --warmup 5
  bench lcm --workloads sd15-lcm4-self --modes none,cudagraph,compile --frames 150 --warmup 5 --check --profile
elif [ "$part" = 3 ]; then
  # Compile variants on SD-Turbo img2img: inductor defaults (+ none/cudagraph for VRAM), freezing +
  # 1x1 convs as matmuls, and compile's own per-module CUDA graphs (reduce-overhead) without the step graph.
  export -f bench
  timeout 200 bash -c 'bench v-default --workloads sd-turbo-img2img --modes none,cudagraph,compile --no-baseline --frames 150 --profile'
  timeout 200 env SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1 bash -c 'bench v-freeze --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile'
  timeout 200 env SCOPE_STREAMDIFFUSION_COMPILE_MODE=reduce-overhead SCOPE_STREAMDIFFUSION_STEP_GRAPH=0 bash -c 'bench v-ro --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile'
elif [ "$part" = 4 ]; then
  # The default compile (frozen weights since this run) with the correctness checks.
  export -f bench
  timeout 250 bash -c 'bench frozen --workloads sd-turbo-img2img --modes none,compile --no-baseline --frames 150 --check --profile'
else
  bench sdxl1024 --workloads sdxl-turbo-1024 --modes none,cudagraph,compile --frames 60 --warmup 5 --profile
  bench sdxl512 --workloads sdxl-turbo-512 --modes none,cudagraph --frames 100 --warmup 5 --check
fi
du -sh ~/.cache/scope-streamdiffusion/* 2>/dev/null
