#!/usr/bin/env bash
# The GPU benchmark runs behind BENCHMARKS.md, on a bare H200 machine (python3 with torch, no
# diffusers/compel/pydantic: installed from wheels in .whl/ when missing, see BENCHMARKS.md).
#   bash scripts/bench-h200.sh 1   # SD-Turbo img2img/txt2img: 1 and 2 frames per call, checks, warm restart
#   bash scripts/bench-h200.sh 2   # SD1.5 LCM 4-step (1 and 2 frames per call), SDXL-Turbo 1024²
#   bash scripts/bench-h200.sh 3   # SDXL-Turbo 512² and 1024² with 2 frames per call
#   bash scripts/bench-h200.sh 4   # compile variants on SD-Turbo img2img (default unfrozen, reduce-overhead)
#   bash scripts/bench-h200.sh 5   # R3: host share of a call; combo kernels, PDL, GEMM autotuning
#   bash scripts/bench-h200.sh 6   # R3: PDL (programmatic dependent launch)
#   bash scripts/bench-h200.sh 7   # R3: fp8 linear layers (torchao) on SD-Turbo, checked against eager
#   bash scripts/bench-h200.sh 8   # R3: frozen weights + PDL on SD-Turbo img2img/txt2img and SD1.5 LCM
#   bash scripts/bench-h200.sh 9   # R3: fp8 on SDXL-Turbo 1024², with the diffusers baseline (not run)
#   bash scripts/bench-h200.sh 10  # R3: the default compile with two frames per call
#   bash scripts/bench-h200.sh 11  # R3: SDXL-Turbo 1024², two frames per call, against diffusers batched
#   bash scripts/bench-h200.sh 12  # R4: cuDNN engine search, fused attention projections, cuBLASLt
#   bash scripts/bench-h200.sh 13  # R4: the new defaults (fused projections, frames converted in the graph)
#   bash scripts/bench-h200.sh 14  # R4: SDXL-Turbo 1024² with them; frozen LCM; PDL
#   bash scripts/bench-h200.sh 15  # R4: --check of the new defaults; two frames per call for txt2img, LCM
#   bash scripts/bench-h200.sh 16  # webcam-size frames: resized in the graph vs on the host (run as part 19)
#   bash scripts/bench-h200.sh 17  # R5: the decode overlapped with the next call's UNet (code since removed)
#   bash scripts/bench-h200.sh 19  # R5: the same forked after the encoder (removed); webcam-size frames
#   bash scripts/bench-h200.sh 20  # R5: a stream's first source size raw at once (one capture); --check
#   bash scripts/bench-h200.sh 21  # R5: SDXL-Turbo 1024² against diffusers, with the current defaults
#   bash scripts/bench-h200.sh 22  # R5: background compilation: cudagraph at once, then compile
#   bash scripts/bench-h200.sh 23  # R6: background compilation with Python's default GIL switch interval
#                                  #     vs a short one, cold caches; then warm
#   bash scripts/bench-h200.sh 24  # R6: background-compile per batch shape (the new auto): a change of
#                                  #     steps mid-stream, cold cache, then warm; LCM cold
#   bash scripts/bench-h200.sh 25  # R6: the same, long enough for the changed shape to compile too
#   bash scripts/bench-h200.sh 26  # R6: --check of cudagraph and compile after the per-shape change;
#                                  #     background-compile text-to-image (never calls the encoder)
#   bash scripts/bench-h200.sh 27  # R7: a 7-minute Scope-style stream under the default (scripts/soak.py),
#                                  #     cold cache; then a process that exits while compiling
#   bash scripts/bench-h200.sh 29  # R7: part 27's stream again after the fix for interrupted captures
#   bash scripts/bench-h200.sh 30  # R7: the first 150 s of that stream with the final code (cold cache)
#   bash scripts/bench-h200.sh 28  # R8: inductor fusion/tiling options on SD-Turbo img2img, kernel time by family
#   bash scripts/bench-h200.sh 31  # R8: interrupted captures retried on the GPU; strength moved on every
#                                  #     call (before/after one-buffer schedules); max_autotune_pointwise
#   bash scripts/bench-h200.sh 32  # R8: part 31's capture check again; cuDNN's fused attention (PyTorch's pick)
#                                  #     vs FlashAttention-2 (SDPA_WORKLOADS, default LCM and SD-Turbo)
#   bash scripts/bench-h200.sh 33  # R8: part 30's Scope-style stream for 200 s with this round's code
#   bash scripts/bench-h200.sh 34  # R8: the capture check after that round's fix
#   bash scripts/bench-h200.sh 35  # R9: inductor's GEMM autotuning given most of a call; its per-GEMM tables
#   bash scripts/bench-h200.sh 36  # R9: part 33's stream with slow calls recorded (what each one did)
#   bash scripts/bench-h200.sh 37  # R9: max_autotune with cuBLAS the only GEMM choice (it timed no convolution), then the default
#   bash scripts/bench-h200.sh 38  # R9: part 37 mended: Triton's GEMM templates off, its convolution templates timed
#   bash scripts/bench-h200.sh 39  # R10: part 36's stream with gc pacing on over start-up's frozen objects;
#                                  #     the CPU check of pacing (gc-during-compile.py) on the same machine
#   bash scripts/bench-h200.sh 40  # R10: the Scope-style stream for 450 s with the final code (cold cache)
#   bash scripts/bench-h200.sh 41  # R10: bfloat16 against float16 (SD-Turbo img2img, compile)
#   bash scripts/bench-h200.sh 42  # R11: TAESD's ReLUs fused into its convolutions vs separate (SD-Turbo)
#   bash scripts/bench-h200.sh 43  # R11: the same for SDXL-Turbo 1024²; the default in a 200-s Scope-style stream
#   bash scripts/bench-h200.sh 44  # R11: the same A/B for SD1.5 LCM 4-step
#   bash scripts/bench-h200.sh 45  # R11: the same A/B in cudagraph, all four workloads
#   bash scripts/bench-h200.sh 46  # R11: a variant (the op's output layout following the weight too), reverted
#   bash scripts/bench-h200.sh 47  # R12: shared time-embedding / prompt key-value projections vs separate (SD-Turbo)
#   bash scripts/bench-h200.sh 48  # R12: the same A/B for SD1.5 LCM 4-step
#   bash scripts/bench-h200.sh 49  # R12: the same A/B for SDXL-Turbo 1024² (not run)
#   bash scripts/bench-h200.sh 50  # R12: part 48's LCM --check and A/B again; SDXL-Turbo 1024² --check
#   bash scripts/bench-h200.sh 51  # R12: the A/B inside one process (LCM, SD-Turbo img2img)
#   bash scripts/bench-h200.sh 52  # R12: --check of LCM with shared projections; the in-process A/B for txt2img
#   bash scripts/bench-h200.sh 53  # R13: TAESD's decoder upsamplings three ways (scripts/kernel-trace.py); the
#                                  #     folded ones against the separate in one process (txt2img); kernel traces
#   bash scripts/bench-h200.sh 54  # R13: TAESD's first/last convolutions padded (scripts/conv-shapes.py); in one
#                                  #     process: the decoder's input laid out as its weights (txt2img, LCM), the
#                                  #     folded upsamplings (img2img)
#   bash scripts/bench-h200.sh 55  # R13: in one process: TAESD's 3-channel convolutions padded (txt2img, img2img);
#                                  #     inductor's split reductions off (txt2img, LCM)
#   bash scripts/bench-h200.sh 56  # R13: --check and profile of the new defaults (SD-Turbo, SD1.5 LCM)
#   bash scripts/bench-h200.sh 57  # R13: in one process, R12's TAESD against R13's (all three rewrites), each workload
#   bash scripts/bench-h200.sh 58  # R13: part 57 in cudagraph (what auto runs while it compiles)
#   bash scripts/bench-h200.sh 59  # inductor's split reductions off, in one process with dynamo reset
#   bash scripts/bench-h200.sh 60  # R14: the conditioning precomputed against computed in the step, in one process
#                                  #     (run with 84e6fbc's code, whose SCOPE_STREAMDIFFUSION_PRECOMPUTE_CONDITIONING
#                                  #     switch was removed after it; see BENCHMARKS.md R14)
#   bash scripts/bench-h200.sh 61  # R14: SDXL-Turbo 1024² --check with R13's code; part 59's txt2img
#   bash scripts/bench-h200.sh 62  # R14: a 300-s Scope-style stream under the default (auto) with R13's code
#   bash scripts/bench-h200.sh 63  # R14: the same for 240 s with the shared projections' state set in the forward
#   bash scripts/bench-h200.sh 64  # R15: the memset nodes cuDNN puts in the step graph (scripts/memset-nodes.py):
#                                  #     the attention calls per SDPA backend, the 8x8 convolutions five ways (PARTS=conv)
#   bash scripts/bench-h200.sh 65  # R15: the UNet's GroupNorms alone: inductor's split reductions, not split,
#                                  #     cooperative, and one Triton kernel each (scripts/groupnorm-probe.py)
#   bash scripts/bench-h200.sh 66  # R15: the UNet's 3x3 convolutions over <= 64 pixels as GEMMs when compiled, off
#                                  #     and on in one process (SD-Turbo txt2img, img2img)
#   bash scripts/bench-h200.sh 67  # R15: --check and profile with them (SD-Turbo img2img, txt2img); the
#                                  #     Scope-style stream under the default (auto) for 190 s, cold cache
#   bash scripts/bench-h200.sh 68  # R15: part 66 up to 256 pixels (the 16x16 level at one frame, the 8x8 level at
#                                  #     four rows) against up to 64, in one process (txt2img, SD1.5 LCM, img2img)
#   bash scripts/bench-h200.sh 69  # R15: the final code in a separate process: the three one-frame workloads
#   bash scripts/bench-h200.sh 70  # R16: part 65's GroupNorms with the two-kernel form (engine/group_norm.py)
#   bash scripts/bench-h200.sh 71  # R16: the UNet's GroupNorms as the two-kernel form, off and on in one process
#                                  #     (SD-Turbo txt2img, SD1.5 LCM)
#   bash scripts/bench-h200.sh 72  # R16: the same with conv1's bias and the time embedding inside norm2's kernels
#                                  #     (txt2img, img2img); 2048 values a statistics program against 1024 (txt2img)
#   bash scripts/bench-h200.sh 73  # R16: --check and profile with them (SD-Turbo img2img, txt2img, SD1.5 LCM)
#   bash scripts/bench-h200.sh 74  # R16: the Scope-style stream under the default (auto) for 190 s, cold cache
#   bash scripts/bench-h200.sh 75  # R16: SDXL-Turbo 1024² --check and profile with them
#   bash scripts/bench-h200.sh 76  # R16: part 73 again, later code
#   bash scripts/bench-h200.sh 77-83  # R17: the residual sums fused into the norms (see the parts below)
#   bash scripts/bench-h200.sh 84  # R18: where the host share of a call goes (scripts/host-profile.py)
#   bash scripts/bench-h200.sh 85  # R18: small groups' GroupNorms in one program: per level, then A/Bs
#   bash scripts/bench-h200.sh 86  # R18: the default limit against none (txt2img, LCM), same process
#   bash scripts/bench-h200.sh 87  # R18: --check and profile with the final code
#   bash scripts/bench-h200.sh 88  # R18: the Scope-style stream under auto for 190 s
#   bash scripts/bench-h200.sh 89  # R18: img2img, one program for small groups off/on in one process
#   bash scripts/bench-h200.sh 90  # R18: --check with the final code (txt2img, img2img)
#   bash scripts/bench-h200.sh 91  # R19: --check of R18's last code; a kernel trace of txt2img as it is
#   bash scripts/bench-h200.sh 92  # R19: the self-attentions alone, cuDNN as called against the keys split (attention-probe.py)
#   bash scripts/bench-h200.sh 93  # R19: the keys split in the pipeline: off/on in one process; --check
#   bash scripts/bench-h200.sh 94  # R19: --check of the final code: SD-Turbo, LCM, SDXL-Turbo 1024²
#   bash scripts/bench-h200.sh 95  # R19: the Scope-style stream under auto for 190 s
#   bash scripts/bench-h200.sh 96  # R19: after the review: the package's split in the probe; compile against none
#   bash scripts/bench-h200.sh 97  # R19: the probe again, timed by memset-nodes.py's graph_ms (its own copy removed)
#   bash scripts/bench-h200.sh 98  # R20: conv1's bias beside the time embedding in norm2's operator, off/on in one
#                                  #     process (txt2img, img2img); the txt2img step traced kernel by kernel
#   bash scripts/bench-h200.sh 99  # R20: --check of the final code: SD-Turbo, LCM, SDXL-Turbo 1024²
#   bash scripts/bench-h200.sh 101 # R20: the final code: compile against none (--check); the Scope-style stream
#                                  #     under auto for 150 s
#   bash scripts/bench-h200.sh 102 # R20: two frames per call against diffusers batched the same (SD-Turbo 512²)
#   bash scripts/bench-h200.sh 103 # R20: SDXL-Turbo 1024², one frame per call, against diffusers
#   bash scripts/bench-h200.sh 100 # R20: TAESD's last convolution alone three ways (scripts/last-conv-probe.py); as
#                                  #     the Triton kernel off/on in one process (txt2img, img2img); run with
#                                  #     40dbde5's code (the kernel and the probe were removed after it, see BENCHMARKS.md R20)
#   bash scripts/bench-h200.sh 104 # R21: fp8 attention-block layers on top of the defaults, SDXL-Turbo 1024², off/on in one process
#   bash scripts/bench-h200.sh 105 # R21: the same in bfloat16 scaled per row, against float16 without fp8
#   bash scripts/bench-h200.sh 106 # R21: SDXL-Turbo 1024², two frames per call, against diffusers batched the same
#   bash scripts/bench-h200.sh 107 # R21: a 16:9 stream (640x360), the defaults against none, --check
#   bash scripts/bench-h200.sh 108 # R21: SDXL-Turbo 1024² under the default (auto) from a cold cache
#   bash scripts/bench-h200.sh 109 # R22: SD-Turbo at 256², against none and diffusers, --check; then a warm restart
#   bash scripts/bench-h200.sh 110 # R22: where a warm start's time goes: cold, warm, warm under cProfile (SD-Turbo img2img 512²)
#   bash scripts/bench-h200.sh 111 # R22: a runtime LoRA's scale moved while streaming (compile, cudagraph): no new graph
#   bash scripts/bench-h200.sh 112 # R22: the final code (decoded frames made finite), SD-Turbo img2img/txt2img, --check
#   bash scripts/bench-h200.sh 113 # R23: a 190-s Scope-style stream whose prompts change by overlapping transitions
#   bash scripts/bench-h200.sh 114 # R23: the final code, SD-Turbo img2img/txt2img, against none, --check
#   bash scripts/bench-h200.sh 115 # R23: part 113's stream with plain prompt changes, on its machine (the comparison)
# Parts 1-3 measure compile with frozen weights (opt-in, as in BENCHMARKS.md round R2);
# FROZEN= (empty) measures the default instead.
# Results: $OUT (or ./bench-out) *.json and *.log. Each step has a time limit, so one slow
# compilation cannot eat the machine's whole call.
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
FROZEN=${FROZEN-freezing=1,conv_1x1_as_mm=1}
bench() {  # bench NAME SECONDS ARGS...
  local name=$1 limit=$2 start=$SECONDS; shift 2; echo "=== $name: $*"
  timeout "$limit" python3 -m scope_streamdiffusion.bench --random-weights --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"; grep -E "^(sd|ratios|check|WARNING|ERROR)" "$OUT/$name.log" | cut -c1-400
}
bg_summary() {  # bg_summary OUT_STEM: the lines of a background-compile-timeline.py report worth reading
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ("load_s","first_call_ms","compile_s","failed","peak_vram_gb","vs_none_max_abs","compiled_at_end","switch_interval_after")}); [print(ph, r[ph]) for ph in ("first","changed") if ph in r]; print("windows", [(w["window_s"], w["fps_p50"], w["max_ms"], w["kinds"]) for w in r["windows"]])' \
    "$1.json" || tail -5 "$1.log"
}
alternate() {  # alternate VAR "A1 B1 A2 B2" "4 LIMITS" MODES FIRST_B_MODES ARGS...: an A/B on one machine,
  # A with VAR=0 (the switch off), B the default, in the order A B A B; the first B also runs --check.
  local var=$1 names=($2) limits=($3) modes=$4 first_b_modes=$5; shift 5
  ( export "$var=0"; bench "${names[0]}" "${limits[0]}" --modes "$modes" "$@" )
  bench "${names[1]}" "${limits[1]}" --modes "$first_b_modes" "$@" --check
  ( export "$var=0"; bench "${names[2]}" "${limits[2]}" --modes "$modes" "$@" )
  bench "${names[3]}" "${limits[3]}" --modes "$modes" "$@"
}
# R13's three TAESD rewrites, off and on (for ab's "env" variable).
R13_OFF=SCOPE_STREAMDIFFUSION_TAESD_INPUT_LAYOUT=0,SCOPE_STREAMDIFFUSION_FOLD_UPSAMPLES=0,SCOPE_STREAMDIFFUSION_PAD_THIN_CONVS=0
R13_ON=${R13_OFF//=0/=1}
ab() {  # ab NAME SECONDS WORKLOAD VAR [A B [MODE]]: VAR=A (0) against VAR=B (1) inside one process (scripts/ab-same-process.py)
  local name=$1 limit=$2 workload=$3 var=$4 a=${5:-0} b=${6:-1} mode=${7:-compile} start=$SECONDS; echo "=== $name: $workload $var $a $b $mode"
  timeout "$limit" python3 scripts/ab-same-process.py "$OUT/$name.json" "$workload" "$var" "$a" "$b" 6 100 "$mode" > "$OUT/$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"; grep -E "^($a|$b|\{)|Error" "$OUT/$name.log" | cut -c1-300
}
rows() {  # rows PREFIX: every result row (fps, p50, p99, VRAM, start-up, graph alone, kernels, families) and check of PREFIX-*.json
  for f in "$OUT"/"$1"-*.json; do
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); n=sys.argv[1].split("/")[-1]
for r in d["results"]:
    p=r.get("profile") or {}; print(n, r["workload"], r["mode"], r.get("fps_p50"), r.get("p50_ms"), r.get("p99_ms"), r.get("peak_vram_gb"), r.get("startup_s"), p.get("graph_replay_ms_per_call"), p.get("kernel_ms_per_frame"), p.get("kernel_launches_per_frame"), p.get("kernel_kinds"), r.get("error"))
for c in d.get("checks", []): print(n, "check", c)' "$f"
  done
}
split_counts() {  # split_counts PREFIX: the attentions split and residual sums fused per result row of PREFIX-*.json
  python3 -c 'import json,sys; [print(f.split("/")[-1], r["workload"], r.get("split_attentions"), r.get("fused_residual_adds")) for f in sys.argv[1:] for r in json.load(open(f))["results"]]' "$OUT"/"$1"-*.json
}
capture_check() {  # scripts/capture-retry-check.py, its log's messages and its report
  local start=$SECONDS
  timeout 150 python3 scripts/capture-retry-check.py "$OUT/capture-retry.json" > "$OUT/capture-retry.log" 2>&1
  echo "capture-retry exit $? after $((SECONDS - start)) s"
  grep -E "^(INFO|DEBUG|WARNING|ERROR)|Traceback" "$OUT/capture-retry.log" | cut -c1-400 | head -20
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print({k: v for k, v in r.items() if k != "phases"}); [print(p) for p in r["phases"]]' "$OUT/capture-retry.json" || tail -30 "$OUT/capture-retry.log"
}
soak() {  # soak NAME SECONDS TIMEOUT: scripts/soak.py from a cold inductor cache of its own, then its report
  local name=$1 secs=$2 limit=$3 start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$name timeout "$limit" python3 scripts/soak.py "$secs" "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print({k: v for k, v in r.items() if k not in ("windows", "slow_calls", "stalls")}); [print(w) for w in r["windows"]]; [print("slow", c) for c in r.get("slow_calls", [])[:25]]; [print("stall", s["t"], s["ms"], {k.split("#")[0]: v[:3] for k, v in s["before"].items() if not k.startswith("soak-watcher")}) for s in r.get("stalls", [])[:10]]' "$OUT/$name.json" || tail -20 "$OUT/$name.log"
  grep -E "WARNING|Error" "$OUT/$name.log" | cut -c1-300 | head -20
}
case "$part" in
1|2|3) export SCOPE_STREAMDIFFUSION_INDUCTOR=$FROZEN ;;
esac
case "$part" in
1)
  bench sdturbo 300 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,compile --frames 150 --check --profile
  # A restart: the same compile with inductor's on-disk cache warm.
  bench sdturbo-warm 120 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150
  # Two frames per call (frame_buffer_size=2): throughput against latency.
  bench sdturbo-fbs2 240 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --frame-buffer-size 2 --frames 100 --profile
  ;;
2)
  bench lcm 200 --workloads sd15-lcm4-self --modes none,compile --frames 150 --profile
  bench lcm-fbs2 150 --workloads sd15-lcm4-self --modes compile --no-baseline --frame-buffer-size 2 --frames 100
  bench sdxl1024 240 --workloads sdxl-turbo-1024 --modes compile --frames 60 --profile
  ;;
3)
  bench sdxl512 200 --workloads sdxl-turbo-512 --modes compile --frames 100 --check
  bench sdxl1024-fbs2 240 --workloads sdxl-turbo-1024 --modes compile --frame-buffer-size 2 --frames 40
  ;;
4)
  bench v-default 200 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  # R2 run 7 tried this one (frozen + coordinate descent tuning): it did not finish within 200 s.
  SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1,coordinate_descent_tuning=1 \
    bench v-cdt 200 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_COMPILE_MODE=reduce-overhead SCOPE_STREAMDIFFUSION_STEP_GRAPH=0 \
    bench v-ro 200 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  ;;
5)
  # Round R3: where the host time goes (graph replay alone vs a call) and inductor options that
  # need no code change, each on the default (unfrozen) compile.
  bench r3-default 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_INDUCTOR=combo_kernels=1 \
    bench r3-combo 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_INDUCTOR=triton.enable_pdl=1 \
    bench r3-pdl 100 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_INDUCTOR=max_autotune_gemm=1 \
    bench r3-mag 190 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  ;;
6)
  # Round R3: programmatic dependent launch (PDL, Hopper).
  SCOPE_STREAMDIFFUSION_INDUCTOR=triton.enable_pdl=1 \
    bench r3-pdl 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  ;;
7)
  # Round R3: fp8 linear layers (torchao wheel in .whl/), checked against eager fp16.
  SCOPE_STREAMDIFFUSION_FP8=1 \
    bench r3-fp8 170 --workloads sd-turbo-img2img --modes none,compile --no-baseline --frames 150 --check --profile
  ;;
8)
  # Round R3: the opt-ins that help, together: frozen weights + PDL.
  export SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1,triton.enable_pdl=1
  bench r3-frozen-pdl 210 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  bench r3-frozen-pdl-lcm 150 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150
  ;;
10)
  # Round R3: the default compile (unfrozen) with two frames per call.
  bench r3-fbs2 190 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --no-baseline --frame-buffer-size 2 --frames 100 --profile
  bench r3-lcm-fbs2 130 --workloads sd15-lcm4-self --modes compile --no-baseline --frame-buffer-size 2 --frames 100
  ;;
11)
  bench r3-sdxl-fbs2 215 --workloads sdxl-turbo-1024 --modes compile --frame-buffer-size 2 --frames 40
  ;;
12)
  # Round R4, first call: cuDNN timing every convolution engine (an experimental
  # SCOPE_STREAMDIFFUSION_CUDNN_BENCHMARK_LIMIT=0, since removed: no gain), fused attention
  # projections (off then: FUSE_QKV=0 reproduces that default), cuBLASLt; on one machine.
  export SCOPE_STREAMDIFFUSION_FUSE_QKV=0
  bench r4-default 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_CUDNN_BENCHMARK_LIMIT=0 \
    bench r4-cudnn0 80 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_FUSE_QKV=1 \
    bench r4-fuse 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_FUSE_QKV=1 SCOPE_STREAMDIFFUSION_CUDNN_BENCHMARK_LIMIT=0 \
    bench r4-fuse-cudnn0 90 --workloads sd-turbo-img2img --modes none,compile --no-baseline --frames 150 --check --profile
  SCOPE_STREAMDIFFUSION_FUSE_QKV=1 SCOPE_STREAMDIFFUSION_CUDNN_BENCHMARK_LIMIT=0 TORCH_BLAS_PREFER_CUBLASLT=1 \
    bench r4-lt 70 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_FUSE_QKV=1 SCOPE_STREAMDIFFUSION_CUDNN_BENCHMARK_LIMIT=0 \
    bench r4-txt 70 --workloads sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  ;;
13)
  # Round R4, second call: the new defaults (fused projections, raw uint8 frames converted inside
  # the step graph) against fused projections off, on one machine; txt2img, two frames per call,
  # LCM; frozen weights (opt-in) on top.
  bench r4-new 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_FUSE_QKV=0 \
    bench r4-unfused 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  bench r4-new-txt 70 --workloads sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  bench r4-new-fbs2 110 --workloads sd-turbo-img2img --modes compile --no-baseline --frame-buffer-size 2 --frames 100 --profile
  bench r4-new-lcm 130 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1 \
    bench r4-new-frozen 120 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  ;;
14)
  # Round R4, third call: SDXL-Turbo 1024² with the new defaults against diffusers; frozen weights
  # (opt-in) on SD1.5 LCM; programmatic dependent launch on the new defaults.
  bench r4-sdxl1024 250 --workloads sdxl-turbo-1024 --modes compile --frames 60 --profile
  SCOPE_STREAMDIFFUSION_INDUCTOR=freezing=1,conv_1x1_as_mm=1 \
    bench r4-lcm-frozen 130 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_INDUCTOR=triton.enable_pdl=1 \
    bench r4-pdl 130 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  ;;
15)
  # Round R4, fourth call: correctness of the new defaults against eager (--check), and two frames
  # per call for txt2img and LCM.
  bench r4-check 150 --workloads sd-turbo-img2img,sd15-lcm4-self --modes none,compile --no-baseline --frames 60 --check
  bench r4-fbs2 200 --workloads sd-turbo-txt2img,sd15-lcm4-self --modes compile --no-baseline --frame-buffer-size 2 --frames 100 --profile
  ;;
16)
  # Not run yet: frames at a webcam's size (resized inside the step graph) against host-side
  # conversion, one frame and two frames per call.
  bench src-graph 130 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frames 150 --profile
  SCOPE_STREAMDIFFUSION_RAW_FRAMES=0 \
    bench src-host 80 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frames 150 --profile
  bench src-graph-fbs2 110 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frame-buffer-size 2 --frames 100 --profile
  SCOPE_STREAMDIFFUSION_RAW_FRAMES=0 \
    bench src-host-fbs2 80 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frame-buffer-size 2 --frames 100 --profile
  ;;
17)
  # Round R5, first call: each call's frames decoded during the next call on a side branch of the
  # step graph, beside the encoder and UNet (SCOPE_STREAMDIFFUSION_OVERLAP_DECODE, default on in that
  # experiment; the code was removed after runs 17 and 19: +1% in compile, -1% to +3% in cudagraph).
  bench r5-overlap 170 --workloads sd-turbo-img2img --modes cudagraph,compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_OVERLAP_DECODE=0 \
    bench r5-plain 90 --workloads sd-turbo-img2img --modes cudagraph,compile --no-baseline --frames 150 --profile
  bench r5-txt 70 --workloads sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  bench r5-lcm 140 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_OVERLAP_DECODE=0 \
    bench r5-lcm-plain 60 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  ;;
19)
  # Round R5, second call: the side branch forked after the encoder (removed code, see part 17),
  # against none; webcam-size frames resized in the graph against on the host (part 16).
  bench r5b-overlap 170 --workloads sd-turbo-img2img --modes cudagraph,compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_OVERLAP_DECODE=0 \
    bench r5b-plain 90 --workloads sd-turbo-img2img --modes cudagraph,compile --no-baseline --frames 150 --profile
  SCOPE_STREAMDIFFUSION_OVERLAP_DECODE=0 \
    bench r5b-src-graph 80 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frames 150 --profile
  SCOPE_STREAMDIFFUSION_OVERLAP_DECODE=0 SCOPE_STREAMDIFFUSION_RAW_FRAMES=0 \
    bench r5b-src-host 70 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frames 150 --profile
  ;;
20)
  # Round R5, third call: a stream's first source size goes raw at once (one capture instead of two;
  # the host-side path first so both find inductor's cache warm), and --check of the current defaults.
  SCOPE_STREAMDIFFUSION_RAW_FRAMES=0 \
    bench r5c-src-host 160 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frames 150 --profile
  bench r5c-src-graph 70 --workloads sd-turbo-img2img --modes compile --no-baseline --source-size 1280x720 --frames 150 --profile
  bench r5c-check 220 --workloads sd-turbo-img2img,sd15-lcm4-self --modes none,compile --no-baseline --frames 60 --check
  ;;
21)
  # Round R5, fourth call: SDXL-Turbo 1024² against diffusers with the current defaults (the fused
  # projections as views: R4's VRAM still had the copies).
  bench r5-sdxl1024 250 --workloads sdxl-turbo-1024 --modes compile --frames 60 --profile
  ;;
22)
  # Round R5, fifth call: acceleration="background-compile" streams with cudagraph from the load on
  # while the modules compile in the background, then switches to compile: latency over time, the
  # switch, frames vs "none". (Run 21 ran it as "auto", which started it in that commit.)
  for wl in sd-turbo-img2img:150 sd15-lcm4-self:110; do
    echo "=== background-compile ${wl%%:*}"; start=$SECONDS
    timeout 240 python3 scripts/background-compile-timeline.py "${wl%%:*}" "${wl##*:}" "$OUT/bg-${wl%%:*}.json" \
      > "$OUT/bg-${wl%%:*}.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s"; grep -vE "^ *(\{|\}|\]|\[)" "$OUT/bg-${wl%%:*}.log" | grep -E "switch|before|after|fps_p50|vs_none|mode_at|background|load_s|first|WARNING|Error" | cut -c1-200
  done
  ;;
23)
  # Round R6: the stream while the background compilation runs, with Python's default switch
  # interval (5 ms, the code before R6) and the short one it now sets, each with a cold inductor
  # cache of its own; then the short one again with its cache warm (a restart).
  for run in default:0.005:130 short:0.0001:130 short-warm:0.0001:70; do
    IFS=: read -r tag interval secs <<< "$run"
    echo "=== background-compile img2img, $tag (switch interval $interval s)"; start=$SECONDS
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-${tag%-warm} timeout 220 python3 scripts/background-compile-timeline.py \
      sd-turbo-img2img "$secs" "$OUT/bg-$tag.json" "$interval" > "$OUT/bg-$tag.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s"
    bg_summary "$OUT/bg-$tag"
  done
  ;;
24)
  # Round R6: background-compile compiles each batch shape in the background (the default 'auto' on
  # CUDA now): SD-Turbo img2img from a cold cache, changed to 2 steps at 110 s (a new UNet batch);
  # the same after a restart (warm cache) with the change at 35 s; SD1.5 LCM with its cache cold.
  for run in cold:sd-turbo-img2img:150:110 warm:sd-turbo-img2img:75:35 lcm:sd15-lcm4-self:120:; do
    IFS=: read -r tag wl secs change <<< "$run"
    echo "=== background-compile $wl, $tag"; start=$SECONDS
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r24-${wl} timeout 240 python3 scripts/background-compile-timeline.py \
      "$wl" "$secs" "$OUT/bg24-$tag.json" 0.0001 $change > "$OUT/bg24-$tag.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s"
    bg_summary "$OUT/bg24-$tag"
  done
  ;;
25)
  # Round R6: part 24's cold SD-Turbo run, long enough for the second shape (2 steps from 110 s)
  # to compile in the background as well.
  start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r25 timeout 330 python3 scripts/background-compile-timeline.py \
    sd-turbo-img2img 250 "$OUT/bg25.json" 0.0001 110 2 > "$OUT/bg25.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  bg_summary "$OUT/bg25"
  ;;
26)
  # Round R6, last call: the step runner changed for every graph mode: --check of cudagraph and
  # compile; then background-compile on text-to-image, which never calls the encoder.
  bench r6-check 260 --workloads sd-turbo-img2img --modes none,cudagraph,compile --no-baseline --frames 150 --check
  start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r26 timeout 200 python3 scripts/background-compile-timeline.py \
    sd-turbo-txt2img 110 "$OUT/bg26.json" > "$OUT/bg26.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  bg_summary "$OUT/bg26"
  ;;
27)
  # Round R7: a long stream with the parameters moving as in a live session (soak.py), from a cold
  # inductor cache, so every new shape compiles in the background while it runs; then a stream
  # that ends (and exits) 5 s in, while its compilation runs.
  soak soak 420 480
  start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r27-exit timeout 120 python3 scripts/soak.py 5 - > "$OUT/exit.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s (the process ended while compiling: 0 expected)"
  grep -E "compiling at exit|terminate|Abort|Error" "$OUT/exit.log" | head -5
  ;;
29)
  # Round R7: part 27 found a capture interrupted by the background compiler (the stream then ran
  # without graphs for good): the same stream with interrupted captures and compilations retried.
  soak soak29 420 480
  ;;
30)
  # Round R7, last call: the start of part 29's stream (cold cache: compiling while prompts change)
  # with the final code, in which a prompt waits for a torch.fx trace only when it is encoded.
  soak soak30 150 200
  ;;
28)
  # Round R8: inductor options that change fusion and tiling, not autotuning (which does not compile
  # in time): each against the default on the same machine, from one shared cache (options are part
  # of its key, so each variant compiles cold).
  python3 -c 'import tensorrt' 2>&1 | tail -1; pip list 2>/dev/null | grep -i -E "tensorrt|onnx" || echo "no tensorrt/onnx packages"
  bench r7-default 110 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  for opt in aggressive_fusion triton.prefer_nd_tiling triton.tile_reductions; do
    SCOPE_STREAMDIFFUSION_INDUCTOR=$opt=1 bench "r7-$opt" 110 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  done
  rows r7
  ;;
31)
  # Round R8: (1) interrupted captures retried on a GPU (a thread synchronising the device while
  # each new shape is captured); (2) strength moved on every call (--modulate, Scope's beat sync)
  # against fixed, and against the code before one-buffer schedules (PREV_SRC: that code's src/
  # with this bench.py); (3) the last inductor option of part 28.
  capture_check
  bench r8-fixed 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 300
  bench r8-modulated 70 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 300 --modulate
  if [ -d "${PREV_SRC:-}" ]; then
    PYTHONPATH=/tmp/site:$PREV_SRC bench r8-modulated-prev 70 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 300 --modulate
  fi
  bench r8-fixed-again 70 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 300
  rows r8
  SCOPE_STREAMDIFFUSION_INDUCTOR=max_autotune_pointwise=1 bench r7-max_autotune_pointwise 170 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  rows r7
  ;;
32)
  # Round R8: the attention kernel. PyTorch picks cuDNN's fused attention on Hopper; the same with
  # cuDNN's turned off (FlashAttention-2 then), through a sitecustomize that sets the flag before
  # the bench starts. Each variant from its own cold inductor cache (the choice is compiled in).
  mkdir -p /tmp/sdpa-flash
  echo 'import torch; torch.backends.cuda.enable_cudnn_sdp(False)' > /tmp/sdpa-flash/sitecustomize.py
  capture_check  # first, part 31's check again, with the cleanup after a failed capture reworked
  for wl in ${SDPA_WORKLOADS:-sd15-lcm4-self sd-turbo-img2img}; do
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind-cudnn-$wl bench "r8-sdpa-cudnn-$wl" 140 --workloads $wl --modes compile --no-baseline --frames 150 --profile
    PYTHONPATH=/tmp/sdpa-flash:$PYTHONPATH TORCHINDUCTOR_CACHE_DIR=/tmp/ind-flash-$wl \
      bench "r8-sdpa-flash-$wl" 140 --workloads $wl --modes compile --no-baseline --frames 150 --profile
  done
  rows r8-sdpa
  for f in "$OUT"/r8-sdpa-*.json; do
    python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["results"][0].get("profile") or {}; print(sys.argv[1].split("/")[-1], [(k["name"][:90], k.get("ms_per_frame")) for k in p.get("top_kernels", []) if "att" in k["name"].lower() or "flash" in k["name"].lower() or "fmha" in k["name"].lower()][:4])' "$f"
  done
  ;;
33)
  # Round R8: part 30's stream (cold cache, Scope-style calls, strength moved on every call) for
  # 200 s with this round's code (one-buffer schedules, a new pool after a failed capture).
  soak soak33 200 260
  ;;
34)
  # Round R8: the capture check once more after that round's fix (strength now moved per call).
  capture_check
  ;;
35)
  # Round R9: GEMM autotuning (max_autotune_gemm: Triton's GEMM templates timed against cuBLAS, with
  # the pointwise work after a GEMM fused into the template) given most of the call (R3 gave it
  # 190 s). Inductor prints a table per GEMM it times, so what it gains per GEMM shows even if the
  # compilation does not finish. The default first, on the same machine.
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-default bench r9-default 110 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-mag TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED=all SCOPE_STREAMDIFFUSION_INDUCTOR=max_autotune_gemm=1 \
    bench r9-max_autotune_gemm ${MAG_LIMIT:-420} --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  rows r9
  python3 scripts/autotune-tables.py "$OUT/r9-max_autotune_gemm.log"
  ;;
37)
  # Round R9: part 35's GEMM autotuning does not finish in a call (about 10 s per GEMM shape; its
  # tables also showed Triton's convolution templates ahead of cuDNN's by up to 2x in isolation).
  # Convolutions alone: max_autotune with cuBLAS as the only GEMM choice (nothing to time there).
  # Then the default on the same machine.
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-conv TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED=all TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN \
    SCOPE_STREAMDIFFUSION_INDUCTOR=max_autotune=1 bench r9-conv-autotune ${CONV_LIMIT:-420} --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  python3 scripts/autotune-tables.py "$OUT/r9-conv-autotune.log"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-default bench r9-default 130 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  rows r9
  ;;
38)
  # Round R9: part 37 timed no convolution: inductor offers Triton's convolution templates only when
  # TRITON is among the GEMM backends. Here the GEMMs keep cuBLAS through a sitecustomize that turns
  # Triton's GEMM templates off (this experiment only), and every convolution is timed.
  mkdir -p /tmp/conv-only
  echo 'import torch._inductor.kernel.mm as mm; mm.use_triton_template = lambda *a, **k: False' > /tmp/conv-only/sitecustomize.py
  PYTHONPATH=/tmp/conv-only:$PYTHONPATH TORCHINDUCTOR_CACHE_DIR=/tmp/ind-conv-templates TORCHINDUCTOR_AUTOTUNE_NUM_CHOICES_DISPLAYED=all \
    SCOPE_STREAMDIFFUSION_INDUCTOR=max_autotune=1 bench r9-conv-templates ${CONV_LIMIT:-480} --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  python3 scripts/autotune-tables.py "$OUT/r9-conv-templates.log" | tail -50
  rows r9
  ;;
36)
  # Round R9: part 33's stream again, now that soak.py records what each call over 300 ms did.
  soak soak36 200 260
  ;;
39)
  # Round R10: run 42 (part 36 with gc pacing) showed the long collections unchanged: that machine's
  # python3 starts with 375 objects frozen, which pacing took for a host's heap. Both checks again.
  python3 -c 'import gc; print("frozen at start-up:", gc.get_freeze_count())'
  python3 -I -S -c 'import gc; print("frozen at start-up, -I -S:", gc.get_freeze_count())'
  soak soak39 200 260
  start=$SECONDS; timeout 200 python3 scripts/gc-during-compile.py sd21 paced "$OUT/gc-paced.json" > "$OUT/gc-paced.log" 2>&1
  echo "gc-during-compile exit $? after $((SECONDS - start)) s"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print({k: v for k, v in r.items() if not isinstance(v, list)})' "$OUT/gc-paced.json" || tail -5 "$OUT/gc-paced.log"
  ;;
40)
  # Round R10: the longest stream a call allows, with the paced collector engaged (cold cache).
  soak soak40 450 540
  ;;
41)
  # Round R10: bfloat16 (cuDNN and cuBLAS pick other kernels for it), then float16 on the same machine.
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-bf16 bench r10-bf16 120 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile --dtype bfloat16
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind-fp16 bench r10-fp16 120 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 150 --profile
  rows r10
  ;;
42)
  # Round R11: TAESD's ReLUs inside its convolutions (engine/taesd.py, the default) against the
  # separate ops (SCOPE_STREAMDIFFUSION_FUSE_TAESD=0), alternated on one machine; --check of the default.
  python3 scripts/taesd-fused-conv.py "$OUT/taesd-512.json" 512 > "$OUT/taesd-512.log" 2>&1; grep -E "^(stock|fused)-" "$OUT/taesd-512.log"
  alternate SCOPE_STREAMDIFFUSION_FUSE_TAESD "r11-a-sep r11-b-fused r11-c-sep r11-d-fused" "200 150 90 90" compile none,compile \
    --workloads sd-turbo-img2img,sd-turbo-txt2img --no-baseline --frames 150 --profile
  rows r11
  ;;
43)
  # Round R11: the same for SDXL-Turbo 1024² (TAESD-XL); then the default (background-compile)
  # with the fused ops in part 40's Scope-style stream for 200 s, cold cache.
  SCOPE_STREAMDIFFUSION_FUSE_TAESD=0 bench r11-e-sdxl-sep 220 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile
  bench r11-f-sdxl-fused 110 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile --check
  rows r11
  soak r11-soak 200 240
  ;;
44)
  # Round R11: the same A/B for SD1.5 LCM 4-step (self-CFG, stream batch of 4).
  alternate SCOPE_STREAMDIFFUSION_FUSE_TAESD "r11-g-lcm-sep r11-h-lcm-fused r11-i-lcm-sep r11-j-lcm-fused" "150 90 60 60" \
    compile compile --workloads sd15-lcm4-self --no-baseline --frames 150 --profile
  rows r11
  ;;
45)
  # Round R11: the same A/B in `cudagraph` (eager kernels in the step graph: what `auto` runs while it
  # compiles, and where Triton is missing), all four workloads, alternated.
  W=sd-turbo-img2img,sd-turbo-txt2img,sd15-lcm4-self,sdxl-turbo-1024
  alternate SCOPE_STREAMDIFFUSION_FUSE_TAESD "r11-k-cg-sep r11-l-cg-fused r11-m-cg-sep r11-n-cg-fused" "150 100 100 100" \
    cudagraph cudagraph --workloads $W --no-baseline --frames 100
  rows r11
  ;;
46)
  # Round R11: a variant, since reverted (the fused op's output channels_last when its input or its
  # weight is): --check against none and the profile's memset/copy, SD-Turbo, compile.
  bench r11-o-final 200 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,compile --no-baseline --frames 150 --profile --check
  rows r11
  ;;
47)
  # Round R12: the time-embedding and prompt key/value projections each as one GEMM
  # (engine/projections.py, the default) against separate GEMMs (SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS=0),
  # alternated on one machine; --check of the default.
  alternate SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS "r12-a-sep r12-b-shared r12-c-sep r12-d-shared" "200 170 80 80" \
    compile none,compile --workloads sd-turbo-img2img,sd-turbo-txt2img --no-baseline --frames 150 --profile
  rows r12
  ;;
48)
  # Round R12: the same A/B for SD1.5 LCM 4-step (self-CFG, stream batch of 4).
  alternate SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS "r12-e-lcm-sep r12-f-lcm-shared r12-g-lcm-sep r12-h-lcm-shared" "150 100 50 50" \
    compile compile --workloads sd15-lcm4-self --no-baseline --frames 150 --profile
  rows r12
  ;;
49)
  # Round R12: the same A/B for SDXL-Turbo 1024² (70 key/value projections shared), --check of the default.
  bench r12-i-sdxl-shared 250 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile --check
  SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS=0 bench r12-j-sdxl-sep 250 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile
  rows r12
  ;;
50)
  # Round R12, run after part 48 on the same machine (whose --check ran out of time while compiling):
  # --check of LCM with shared projections, the LCM A/B once more, SDXL-Turbo 1024² with --check.
  bench r12-k-lcm-shared 90 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile --check
  SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS=0 bench r12-l-lcm-sep 50 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  bench r12-m-lcm-shared 50 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  bench r12-i-sdxl-shared 280 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile --check
  rows r12
  ;;
51)
  # Round R12: the same A/B inside one process (scripts/ab-same-process.py: both pipelines loaded,
  # their calls timed in alternating blocks), SD1.5 LCM 4-step then SD-Turbo img2img.
  for wl in sd15-lcm4-self sd-turbo-img2img; do
    start=$SECONDS; timeout 270 python3 scripts/ab-same-process.py "$OUT/r12-ab-$wl.json" $wl SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS 0 1 6 100 > "$OUT/r12-ab-$wl.log" 2>&1
    echo "$wl exit $? after $((SECONDS - start)) s"; grep -E "^(0|1|\{)|Error" "$OUT/r12-ab-$wl.log" | cut -c1-300
  done
  ;;
52)
  # Round R12: --check of SD1.5 LCM 4-step with the shared projections (parts 48 and 50 ran out of
  # time compiling it); the in-process A/B for SD-Turbo txt2img.
  bench r12-n-lcm-shared 250 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 100 --check
  start=$SECONDS; timeout 160 python3 scripts/ab-same-process.py "$OUT/r12-ab-sd-turbo-txt2img.json" sd-turbo-txt2img SCOPE_STREAMDIFFUSION_SHARE_PROJECTIONS 0 1 6 100 > "$OUT/r12-ab-sd-turbo-txt2img.log" 2>&1
  echo "txt2img exit $? after $((SECONDS - start)) s"; grep -E "^(0|1|\{)|Error" "$OUT/r12-ab-sd-turbo-txt2img.log" | cut -c1-300
  ;;
53)
  # Round R13: the TAESD decoder alone three ways, then the in-process A/B of the folded upsamplings
  # (SD-Turbo txt2img), then kernel traces (compiled and eager) of SD-Turbo txt2img and SD1.5 LCM.
  start=$SECONDS; timeout 150 python3 scripts/kernel-trace.py decoder "$OUT/r13-trace" sd-turbo-txt2img > "$OUT/r13-decoder.log" 2>&1
  echo "decoder exit $? after $((SECONDS - start)) s"; grep -vE "^\s*$" "$OUT/r13-decoder.log" | grep -E "^(as-is|transposed|sub-pixel|\{)|Error" | cut -c1-300
  ab r13-ab-fold-sd-turbo-txt2img 200 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_FOLD_UPSAMPLES
  start=$SECONDS; timeout 180 python3 scripts/kernel-trace.py trace "$OUT/r13-trace" sd-turbo-txt2img sd15-lcm4-self > "$OUT/r13-trace.log" 2>&1
  echo "traces exit $? after $((SECONDS - start)) s"; grep -E "traced|failed|Error" "$OUT/r13-trace.log" | cut -c1-300
  ;;
54)
  # Round R13: cuDNN's time for TAESD's first and last convolutions and padded variants; then in-process
  # A/Bs: the decoder's input laid out as its weights (txt2img, LCM), the folded upsamplings (img2img).
  for size in 512 1024; do timeout 60 python3 scripts/conv-shapes.py "$OUT/r13-conv-shapes-$size.json" $size > "$OUT/r13-conv-shapes-$size.log" 2>&1; echo "conv shapes $size exit $?"; done
  python3 -c "import json,sys; [print(s, json.load(open(f'$OUT/r13-conv-shapes-{s}.json'))) for s in (512, 1024)]" 2>&1 | cut -c1-900
  ab r13-ab-layout-sd-turbo-txt2img 150 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_TAESD_INPUT_LAYOUT
  ab r13-ab-fold-sd-turbo-img2img 150 sd-turbo-img2img SCOPE_STREAMDIFFUSION_FOLD_UPSAMPLES
  ab r13-ab-layout-sd15-lcm4-self 200 sd15-lcm4-self SCOPE_STREAMDIFFUSION_TAESD_INPUT_LAYOUT
  ;;
55)
  # Round R13, in-process A/Bs: TAESD's 3-channel convolutions padded; inductor's split reductions
  # (each GroupNorm is 3-4 kernels, its reduction split in stages) off.
  ab r13-ab-pad-sd-turbo-txt2img 120 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_PAD_THIN_CONVS
  ab r13-ab-split-sd-turbo-txt2img 190 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_INDUCTOR split_reductions=1 split_reductions=0
  ab r13-ab-pad-sd-turbo-img2img 60 sd-turbo-img2img SCOPE_STREAMDIFFUSION_PAD_THIN_CONVS
  ab r13-ab-split-sd15-lcm4-self 190 sd15-lcm4-self SCOPE_STREAMDIFFUSION_INDUCTOR split_reductions=1 split_reductions=0
  ;;
56)
  # Round R13: --check and --profile of the new defaults (TAESD's decoder input laid out as its weights,
  # its upsamplings folded, its 3-channel convolutions padded).
  bench r13-a-sd-turbo 270 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,compile --no-baseline --frames 150 --profile --check
  bench r13-b-lcm 250 --workloads sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile --check
  rows r13
  ;;
57)
  # Round R13: R12's code against R13's defaults in one process (the three TAESD rewrites off / on).
  ab r13-ab-all-sd-turbo-img2img 130 sd-turbo-img2img env "$R13_OFF" "$R13_ON"
  ab r13-ab-all-sd-turbo-txt2img 60 sd-turbo-txt2img env "$R13_OFF" "$R13_ON"
  ab r13-ab-all-sd15-lcm4-self 150 sd15-lcm4-self env "$R13_OFF" "$R13_ON"
  ;;
58)
  # Round R13: part 57's A/B in cudagraph (eager kernels in the step graph), 6 blocks of 100 calls.
  for wl in sd-turbo-img2img sd-turbo-txt2img sd15-lcm4-self; do
    ab r13-ab-cg-$wl 80 $wl env "$R13_OFF" "$R13_ON" cudagraph
  done
  ;;
59)
  # Part 55's split-reductions A/B again, now that ab-same-process.py resets dynamo before the second
  # load when compile settings differ (in run 59 the second pipeline reused the first's compiled UNet).
  ab split-sd-turbo-txt2img 260 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_INDUCTOR split_reductions=1 split_reductions=0
  ab split-sd15-lcm4-self 290 sd15-lcm4-self SCOPE_STREAMDIFFUSION_INDUCTOR split_reductions=1 split_reductions=0
  ;;
60)
  # Round R14: R13's code against the time projections as a table and the prompt's projection made
  # outside the step, in one process, each workload.
  ab r14-ab-pre-sd-turbo-img2img 150 sd-turbo-img2img SCOPE_STREAMDIFFUSION_PRECOMPUTE_CONDITIONING
  ab r14-ab-pre-sd-turbo-txt2img 90 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_PRECOMPUTE_CONDITIONING
  ab r14-ab-pre-sd15-lcm4-self 190 sd15-lcm4-self SCOPE_STREAMDIFFUSION_PRECOMPUTE_CONDITIONING
  ;;
61)
  # Round R14: SDXL-Turbo 1024² with every rewrite since R12 (TAESD-XL's included), then part 59's txt2img.
  bench r14-c-sdxl1024 300 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile --check
  rows r14-c
  ab split-sd-turbo-txt2img 260 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_INDUCTOR split_reductions=1 split_reductions=0
  ;;
62)
  # Round R14: scripts/soak.py for 300 s from a cold inductor cache, the default acceleration, R13's code.
  soak r14-soak 300 380
  ;;
63)
  # Round R14: part 62's stream for 240 s (minutes 0-3) with the fix it called for.
  soak r14-soak-fixed 240 300
  ;;
64)
  for rows in 1 2 4; do
    start=$SECONDS; timeout 120 python3 scripts/memset-nodes.py "$OUT/r15-memset-nodes-$rows.json" $rows ${PARTS:-sdpa,conv} > "$OUT/r15-memset-nodes-$rows.log" 2>&1
    echo "memset-nodes $rows exit $? after $((SECONDS - start)) s"; grep -vE "^\s*$" "$OUT/r15-memset-nodes-$rows.log" | cut -c1-400
  done
  ;;
65|70)
  tag=r15; [ "$part" = 70 ] && tag=r16
  for rows in ${ROWS:-1 4}; do
    start=$SECONDS; timeout 200 python3 scripts/groupnorm-probe.py "$OUT/$tag-groupnorm-$rows.json" $rows > "$OUT/$tag-groupnorm-$rows.log" 2>&1
    echo "groupnorm $rows exit $? after $((SECONDS - start)) s"; grep -vE "^\s*$|Warn|warn" "$OUT/$tag-groupnorm-$rows.log" | cut -c1-300 | tail -40
  done
  ;;
66)
  ab r15-ab-gemm-sd-turbo-txt2img 270 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS
  ab r15-ab-gemm-sd-turbo-img2img 270 sd-turbo-img2img SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS
  ;;
67)
  bench r15-a-sd-turbo 300 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,compile --no-baseline --frames 150 --profile --check
  rows r15
  soak r15-soak 190 250
  ;;
68)
  ab r15-ab-256-sd-turbo-txt2img 200 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS 64 256
  ab r15-ab-256-sd15-lcm4-self 250 sd15-lcm4-self SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS 64 256
  ab r15-ab-256-sd-turbo-img2img 100 sd-turbo-img2img SCOPE_STREAMDIFFUSION_GEMM_SMALL_CONVS 64 256
  ;;
69)
  bench r15-final 380 --workloads sd-turbo-img2img,sd-turbo-txt2img,sd15-lcm4-self --modes compile --no-baseline --frames 150 --profile
  rows r15
  ;;
71)
  ab r16-ab-gn-sd-turbo-txt2img 270 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM 0 ${ELEMENTS:-2048}
  ab r16-ab-gn-sd15-lcm4-self 300 sd15-lcm4-self SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM 0 ${ELEMENTS:-2048}
  ;;
72)
  ab r16-ab-gn2-sd-turbo-txt2img 200 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM 0 2048
  ab r16-ab-gn2-sd-turbo-img2img 200 sd-turbo-img2img SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM 0 2048
  ab r16-ab-gn-elements-sd-turbo-txt2img 170 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_TRITON_GROUP_NORM 2048 1024
  ;;
73|76)
  tag=r16-a; [ "$part" = 76 ] && tag=r16-final
  bench $tag 540 --workloads sd-turbo-img2img,sd-turbo-txt2img,sd15-lcm4-self --modes none,compile --no-baseline --frames 150 --profile --check
  rows r16
  ;;
74)
  soak r16-soak 190 250
  ;;
75)
  bench r16-c-sdxl1024 330 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --profile --check
  rows r16-c
  ;;
77)  # R17: the residual adds read by a GroupNorm computed inside its operator, off (0) against on (1)
  ab r17-ab-res-sd-turbo-txt2img 270 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ab r17-ab-res-sd-turbo-img2img 270 sd-turbo-img2img SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ;;
78)  # R17 run 84 (with a statistics-kernel variant and a tile switch since removed): the residual adds
  ab r17-ab-res2-sd-turbo-txt2img 170 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ;;
79)  # R17: kernels per frame with the residual adds apart (0) and inside the norms (1), separate processes
  for v in 0 1; do
    SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS=$v bench r17-res-$v 200 --workloads sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
    grep -o '"fused_residual_adds": {[^}]*}' "$OUT/r17-res-$v.json"
  done
  rows r17-res
  ;;
80)  # R17: the adds with the convolutions' and linear layers' biases and the layout copy inside the norms
  SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS=1 bench r17-bias-1 200 --workloads sd-turbo-txt2img --modes compile --no-baseline --frames 150 --profile
  grep -o '"fused_residual_adds": {[^}]*}' "$OUT/r17-bias-1.json"
  rows r17-bias
  ab r17-ab-bias-sd-turbo-txt2img 170 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ab r17-ab-bias-sd-turbo-img2img 170 sd-turbo-img2img SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ;;
81)  # R17: the same for the LCM stream batch (4 rows)
  ab r17-ab-bias-sd15-lcm4-self 300 sd15-lcm4-self SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ;;
86)  # R18: the default limit (5,120 values, 8 warps) against none, txt2img and the LCM stream batch (4 rows)
  ab r18-ab-one-program-8w-txt2img 220 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM 0 1
  ab r18-ab-one-program-8w-lcm 330 sd15-lcm4-self SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM 0 1
  ;;
113)  # R23: the soak's stream with its prompt changes as transitions, each started while the last runs
  SOAK_TRANSITIONS=1 soak r23-soak-transitions 190 250
  ;;
115)  # R23: part 113's stream with the prompt list changed every 2 s instead (no transitions), for comparison
  soak r23-soak-plain 190 250
  ;;
114)  # R23: the final code, SD-Turbo img2img/txt2img, against none, --check
  bench r23-final-1 400 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,compile --no-baseline --frames 300 --check --profile
  rows r23-final
  ;;
112)  # R22: the final code (decoded frames made finite in the step), SD-Turbo img2img/txt2img, against none, --check
  bench r22-final-1 400 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes none,compile --no-baseline --frames 300 --check --profile
  rows r22-final
  ;;
111)  # R22: a runtime LoRA's scale moved 30 times while streaming, compile and cudagraph (scripts/lora-live-check.py)
  start=$SECONDS; timeout 450 python3 scripts/lora-live-check.py "$OUT/r22-lora-live.json" compile cudagraph > "$OUT/r22-lora-live.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"; grep -E "^(compile|cudagraph) |Error|Traceback|WARNING" "$OUT/r22-lora-live.log" | cut -c1-900
  ;;
110)  # R22: a warm start: its cache hits and where its time goes (cold, warm, then warm under cProfile)
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r22-warm
  bench r22-start-cold 200 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 100
  bench r22-start-warm 120 --workloads sd-turbo-img2img --modes compile --no-baseline --frames 100
  start=$SECONDS; timeout 150 python3 -m cProfile -o "$OUT/r22-start-warm.prof" -m scope_streamdiffusion.bench --random-weights \
    --json "$OUT/r22-start-prof.json" --workloads sd-turbo-img2img --modes compile --no-baseline --frames 20 > "$OUT/r22-start-prof.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  python3 -c 'import pstats,sys; p=pstats.Stats(sys.argv[1]); p.sort_stats("cumulative").print_stats(45); p.sort_stats("tottime").print_stats(25)' \
    "$OUT/r22-start-warm.prof" > "$OUT/r22-start-pstats.txt" 2>&1
  python3 -c 'import json,sys; [print(f.split("/")[-1], r["mode"], r.get("startup_s"), r.get("load_s"), r.get("capture_s"), r.get("compile_caches")) for f in sys.argv[1:] for r in json.load(open(f))["results"]]' "$OUT"/r22-start-*.json
  grep -E "compile_fx|_compile|load_by_key|cudnn|capture|FxGraphCache|AOTAutogradCache|triton|compile_inner|aot_|lowering|codecache" "$OUT/r22-start-pstats.txt" | head -40 | cut -c1-200
  ;;
109)  # R22: SD-Turbo at 256² (a small, fast webcam size), against none and diffusers, --check --profile
  bench r22-256-1 400 --workloads sd-turbo-img2img,sd-turbo-txt2img --width 256 --height 256 --modes none,compile --frames 300 --check --profile
  # A restart: the same compile with inductor's on-disk cache warm.
  bench r22-256-warm 120 --workloads sd-turbo-img2img --width 256 --height 256 --modes compile --no-baseline --frames 300
  rows r22-256
  split_counts r22-256
  ;;
108)  # R21: SDXL-Turbo 1024² under the default (auto = background-compile) from a cold cache: eager at once, then compiled
  start=$SECONDS
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r21-sdxl timeout 370 python3 scripts/background-compile-timeline.py \
    sdxl-turbo-1024 230 "$OUT/r21-bg-sdxl.json" > "$OUT/r21-bg-sdxl.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"
  bg_summary "$OUT/r21-bg-sdxl"
  grep -E "WARNING|Error" "$OUT/r21-bg-sdxl.log" | cut -c1-300 | head
  ;;
107)  # R21: a 16:9 stream (640x360: odd latent sizes, 80x45 -> 10x6), the defaults against none, --check
  bench r21-169-1 330 --workloads sd-turbo-img2img,sd-turbo-txt2img --width 640 --height 360 --modes none,compile --no-baseline --frames 150 --check --profile
  rows r21-169
  split_counts r21-169
  python3 -c 'import json,sys; [print(r["workload"], r["mode"], r.get("gemm_small_convs"), r.get("triton_group_norms")) for r in json.load(open(sys.argv[1]))["results"]]' "$OUT/r21-169-1.json"
  ;;
106)  # R21: SDXL-Turbo 1024², two frames per call (frame_buffer_size=2), against diffusers given the same two images a call
  bench r21-sdxl-fbs2-1 330 --workloads sdxl-turbo-1024 --modes compile --frame-buffer-size 2 --frames 40 --profile
  rows r21-sdxl-fbs2
  ;;
105)  # R21: float16 (the default) against bfloat16 with fp8 attention-block layers scaled per row, SDXL-Turbo 1024², one process
  ab r21-ab-fp8row-sdxl 330 sdxl-turbo-1024 env SCOPE_STREAMDIFFUSION_FP8=0,SCOPE_STREAMDIFFUSION_AB_DTYPE=float16 \
    SCOPE_STREAMDIFFUSION_FP8=1,SCOPE_STREAMDIFFUSION_AB_DTYPE=bfloat16
  SCOPE_STREAMDIFFUSION_FP8=1 bench r21-fp8row-sdxl 200 --workloads sdxl-turbo-1024 --dtype bfloat16 --modes none,compile --no-baseline --frames 40 --check --profile
  rows r21-fp8row
  ;;
104)  # R21: fp8 attention-block layers (torchao wheel in .whl/) on top of the defaults, SDXL-Turbo 1024², off/on in one
  # process; then fp8's --check against none
  python3 -c 'import torch, torchao; print("torch", torch.__version__, "torchao", torchao.__version__)' 2>&1 | tail -1
  ab r21-ab-fp8-sdxl 330 sdxl-turbo-1024 SCOPE_STREAMDIFFUSION_FP8 0 1
  SCOPE_STREAMDIFFUSION_FP8=1 bench r21-fp8-sdxl 200 --workloads sdxl-turbo-1024 --modes none,compile --no-baseline --frames 40 --check --profile
  rows r21-fp8
  ;;
94)  # R19: the final code, compile only, --check --profile: SD-Turbo img2img/txt2img, LCM; SDXL-Turbo 1024²
  bench r19-final-1 330 --workloads sd-turbo-txt2img,sd-turbo-img2img,sd15-lcm4-self --modes compile --no-baseline --frames 300 --check --profile
  bench r19-final-sdxl 220 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --check --profile
  rows r19-final
  split_counts r19-final
  ;;
98)  # R20: conv1's bias beside the time embedding in norm2's operator (no sum kernel per block) off/on in one process
  ab r20-ab-bias-txt2img 200 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_BIAS_IN_NORM 0 1
  ab r20-ab-bias-img2img 200 sd-turbo-img2img SCOPE_STREAMDIFFUSION_BIAS_IN_NORM 0 1
  start=$SECONDS; timeout 150 python3 scripts/kernel-trace.py now "$OUT/r20-trace" sd-turbo-txt2img > "$OUT/r20-trace.log" 2>&1
  echo "trace exit $? after $((SECONDS - start)) s"; grep -E "traced|failed|Error" "$OUT/r20-trace.log" | cut -c1-300
  ;;
99)  # R20: the final code, compile only, --check --profile: SD-Turbo img2img/txt2img, LCM; SDXL-Turbo 1024²
  bench r20-final-1 330 --workloads sd-turbo-txt2img,sd-turbo-img2img,sd15-lcm4-self --modes compile --no-baseline --frames 300 --check --profile
  bench r20-final-sdxl 220 --workloads sdxl-turbo-1024 --modes compile --no-baseline --frames 60 --check --profile
  rows r20-final
  split_counts r20-final
  ;;
101)  # R20: the final code against none (eager, the step's launch trims apply there too), then a 150-s Scope-style stream
  bench r20-none-1 200 --workloads sd-turbo-txt2img,sd-turbo-img2img --modes none,compile --no-baseline --frames 100 --check
  rows r20-none
  soak r20-soak 150 210
  ;;
102)  # R20: two frames per call (frame_buffer_size=2), against diffusers given the same two images a call
  bench r20-fbs2-1 420 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --frame-buffer-size 2 --frames 100 --profile
  rows r20-fbs2
  ;;
103)  # R20: SDXL-Turbo 1024², one frame per call, against diffusers (the ratio follows the machine's host speed)
  bench r20-sdxl-1 280 --workloads sdxl-turbo-1024 --modes compile --frames 40
  rows r20-sdxl
  ;;
100)  # R20: TAESD's last convolution (64 -> 3) alone: cuDNN, padded (R13), the Triton kernel; then off/on in one process
  # (40dbde5's code: engine/few_channel_conv.py and scripts/last-conv-probe.py were removed after it)
  start=$SECONDS; timeout 120 python3 scripts/last-conv-probe.py "$OUT/r20-last-conv.json" 512 1024 > "$OUT/r20-last-conv.log" 2>&1
  echo "probe exit $? after $((SECONDS - start)) s"; grep -E "^(512|1024) |Error|error" "$OUT/r20-last-conv.log" | cut -c1-300
  ab r20-ab-lastconv-txt2img 200 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_TRITON_LAST_CONV 0 1
  ab r20-ab-lastconv-img2img 200 sd-turbo-img2img SCOPE_STREAMDIFFUSION_TRITON_LAST_CONV 0 1
  ;;
97)  # R19: the probe once more, now timed through memset-nodes.py's graph_ms
  start=$SECONDS; timeout 150 python3 scripts/attention-probe.py "$OUT/r19-attention-4.json" 2 4 > "$OUT/r19-attention-4.log" 2>&1
  echo "probe exit $? after $((SECONDS - start)) s"; grep -E "^(64|32|16)x|Error|error|Traceback" "$OUT/r19-attention-4.log" | cut -c1-700
  tail -3 "$OUT/r19-attention-4.log"
  ;;
96)  # R19: after the review's changes: the probe with the package's own split; SD-Turbo compile against none (--check)
  start=$SECONDS; timeout 100 python3 scripts/attention-probe.py "$OUT/r19-attention-3.json" 2 4 > "$OUT/r19-attention-3.log" 2>&1
  echo "probe exit $? after $((SECONDS - start)) s"; grep -E "^(64|32|16)x|Error|error" "$OUT/r19-attention-3.log" | cut -c1-700
  bench r19-review-1 260 --workloads sd-turbo-txt2img,sd-turbo-img2img --modes none,compile --no-baseline --frames 200 --check --profile
  rows r19-review
  split_counts r19-review
  ;;
95)  # R19: the Scope-style stream under the default (auto) for 190 s with R19's code, cold cache
  soak r19-soak 190 250
  ;;
93)  # R19: long self-attentions with their keys split (engine/attention_split.py) off/on in one process, then --check
  start=$SECONDS; timeout 100 python3 scripts/attention-probe.py "$OUT/r19-attention-2.json" 2 4 > "$OUT/r19-attention-2.log" 2>&1
  echo "probe exit $? after $((SECONDS - start)) s"; grep -E "^(64|32|16)x|Error|error" "$OUT/r19-attention-2.log" | cut -c1-600
  ab r19-ab-split-txt2img 170 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION 0 1
  ab r19-ab-split-img2img 170 sd-turbo-img2img SCOPE_STREAMDIFFUSION_SPLIT_ATTENTION 0 1
  bench r19-split-1 150 --workloads sd-turbo-txt2img,sd-turbo-img2img --modes compile --no-baseline --frames 300 --check --profile
  rows r19-split
  split_counts r19-split
  ;;
92)  # R19: the UNet's self-attention sizes alone: cuDNN's SDPA against the keys split in 2, 3, 4 parts
  start=$SECONDS; timeout 450 python3 scripts/attention-probe.py "$OUT/r19-attention.json" 2 3 4 > "$OUT/r19-attention.log" 2>&1
  echo "probe exit $? after $((SECONDS - start)) s"; grep -E "^(64|32|16)x|Error|error" "$OUT/r19-attention.log" | cut -c1-600
  ;;
91)  # R19: R18's last code (the kernels' helpers, never run on a GPU), --check; then the txt2img step traced kernel by kernel
  bench r19-r18code-1 250 --workloads sd-turbo-txt2img,sd-turbo-img2img --modes compile --no-baseline --frames 300 --check --profile
  rows r19-r18code
  start=$SECONDS; timeout 150 python3 scripts/kernel-trace.py now "$OUT/r19-trace" sd-turbo-txt2img > "$OUT/r19-trace.log" 2>&1
  echo "trace exit $? after $((SECONDS - start)) s"; grep -E "traced|failed|Error" "$OUT/r19-trace.log" | cut -c1-300
  ;;
90)  # R18: the final code (the kernels' shared parts in Triton helpers), compile only, --check
  bench r18-last-1 250 --workloads sd-turbo-txt2img,sd-turbo-img2img --modes compile --no-baseline --frames 300 --check --profile
  rows r18-last
  ;;
89)  # R18: img2img, the limit's default against none in one process (run on part 88's machine, held)
  ab r18-ab-one-program-img2img-soakmachine 200 sd-turbo-img2img SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM 0 1
  ;;
88)  # R18: the Scope-style stream under the default (auto) for 190 s with R18's code, cold cache
  soak r18-soak 190 250
  ;;
87)  # R18: the final code's workloads, compile only, --check (determinism, parameter changes) and profile
  bench r18-final 300 --workloads sd-turbo-img2img,sd-turbo-txt2img,sd15-lcm4-self --modes compile --no-baseline --frames 300 --check --profile
  rows r18-final
  ;;
85)  # R18: small groups in one program: the GroupNorms per level (1 and 4 rows), then txt2img/img2img A/B at the best limit
  timeout 200 python3 scripts/groupnorm-probe.py "$OUT/r18-gn-levels-1.json" 1 levels > "$OUT/r18-gn-levels-1.log" 2>&1
  echo "probe exit $?"; grep -E "^(two|one)|failed" "$OUT/r18-gn-levels-1.log" | cut -c1-200
  best=$(python3 -c 'import json,statistics,sys; r=json.load(open(sys.argv[1]))["thresholds"]; t={int(k.rsplit("-",1)[1]): statistics.median(x["graph_ms"] for x in v) for k,v in r.items() if isinstance(v,list)}; print(min(t,key=t.get))' "$OUT/r18-gn-levels-1.json")
  echo "best limit at one row: $best"
  if [ "${best:-0}" != 0 ]; then
    ab r18-ab-one-program-txt2img 220 sd-turbo-txt2img SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM 0 "$best"
    ab r18-ab-one-program-img2img 200 sd-turbo-img2img SCOPE_STREAMDIFFUSION_GROUP_NORM_ONE_PROGRAM 0 "$best"
  fi
  ;;
84)  # R18: where the host's share of a txt2img call goes: cold-compiled process, then a warm bench, then img2img
  hp() { local name=$1 limit=$2 start=$SECONDS; shift 2; echo "=== $name: $*"
    timeout "$limit" python3 scripts/host-profile.py "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "exit $? after $((SECONDS - start)) s"; grep -E "^(\{|sd-|Traceback)|Error" "$OUT/$name.log" | cut -c1-700; }
  hp r18-host-txt2img-cold 200 sd-turbo-txt2img compile --frames 300
  bench r18-bench-txt2img-warm 120 --workloads sd-turbo-txt2img --modes compile --no-baseline --frames 300 --profile
  rows r18-bench
  hp r18-host-img2img-cold 200 sd-turbo-img2img compile --frames 300
  ;;
83)  # R17: the final code's one-row workloads, compile only, --check (determinism, parameter changes)
  bench r17-final 170 --workloads sd-turbo-img2img,sd-turbo-txt2img --modes compile --no-baseline --frames 150 --check --profile
  rows r17-final
  ;;
82)  # R17: the same for SDXL-Turbo 1024²
  ab r17-ab-bias-sdxl-turbo-1024 380 sdxl-turbo-1024 SCOPE_STREAMDIFFUSION_FUSE_RESIDUAL_ADDS
  ;;
9)
  SCOPE_STREAMDIFFUSION_FP8=1 bench r3-fp8-sdxl 250 --workloads sdxl-turbo-1024 --modes compile --frames 60 --profile
  ;;
esac
du -sh ~/.cache/scope-streamdiffusion/* 2>/dev/null
