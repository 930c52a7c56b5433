#!/usr/bin/env bash
# The GPU work of one session on one H200, as a few device calls that each fit 600 s. From the
# repo root, after ../shared/gpu/stage.sh:
#     STAGES="tests serpent baselines" bash benchmarks/gpu_session.sh
# Results collect in /tmp/r (kept while the machine stays warm between calls); at the end of
# every call all of it is packed into $OUT/run.tgz (the device tool returns at most 8 files),
# plus the call's log. A stage that finished in an earlier warm call is not run again.
#   tests      the GPU-marked tests (mamba vs chunked vs fused scan, kernel counts)
#   serpent    benchmarks.serpent_kernels: fused vs mamba vs chunked correctness, kernels per
#              forward, eager vs CUDA-graph latency, torch.compile (issue 12)
#   baselines  benchmarks.baseline_formulations: each baseline vs its official formulation
#              (issue 13)
#   overhead   benchmarks.sweep_overhead: per-config overhead by phase, and the wall time of
#              the main command (issue 15)
#   main       the main command twice (issue 12: rising with resolution, runs within 2%)
#   timer      timer_check: serpent_s eager and graph at 256/1024 against triton's do_bench
#   graphtrain one CUDA-graph training step of every model at 256 px
#   compile    bench run --compile for serpent_s (compile time in the row)
#   large      benchmarks.large_images: every model up to 8192 px (largest image per model)
set -u
export OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
R=/tmp/r
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SERPENT_BENCH_DATA="${SERPENT_BENCH_DATA:-$PWD/.gpu/data}"
t0=$SECONDS
DEADLINE=${DEADLINE:-570}  # the device tool stops a command at 600 s; packing takes a few
left() { local l=$(( DEADLINE - SECONDS + t0 )); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }
log() { echo "[$(( SECONDS - t0 )) s] $*"; }
source .gpu/setup.sh > "$R/setup.log" 2>&1
tail -n 2 "$R/setup.log"; log "setup"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$R/gpus.csv"
git rev-parse HEAD > "$R/commit.txt" 2>/dev/null; git status --short >> "$R/commit.txt" 2>/dev/null

stage() {  # stage NAME SECONDS COMMAND...: run once (a marker file says done), output to a log
  local name=$1 limit=$2; shift 2
  if [[ -f "$R/$name.done" ]]; then log "$name: done in an earlier call"; return; fi
  if (( $(left "$limit") < 30 )); then log "$name: no time left"; return; fi
  log "$name: start (at most $(left "$limit") s)"
  timeout "$(left "$limit")" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  [[ $rc == 0 ]] && touch "$R/$name.done"
  tail -n 12 "$R/$name.log"; log "$name: exit $rc"
}
main_twice() {
  for i in 1 2; do
    local s=$SECONDS
    bench run --models serpent,swinir --res 256,512,1024 --no-progress --out "$R/main_$i.jsonl"
    echo "main command run $i: $(( SECONDS - s )) s wall"
  done
}

for s in ${STAGES:-tests serpent baselines}; do
  case $s in
    tests) stage tests 90 python -m pytest -q -m gpu tests -p no:cacheprovider ;;
    serpent) stage serpent 240 python -m benchmarks.serpent_kernels --out "$R/serpent" --deadline-s 220 ;;
    baselines) stage baselines 300 python -m benchmarks.baseline_formulations --out "$R/baselines" --deadline-s 280 ;;
    overhead) stage overhead 200 python -m benchmarks.sweep_overhead --out "$R/overhead" ;;
    main) stage main 200 main_twice ;;
    timer) stage timer 120 python -m benchmarks.timer_check --out "$R/timer_check.jsonl" --rounds 4 --iters 30 --models serpent_s ;;
    graphtrain) stage graphtrain 150 bench run --models all --res 256 --mode train --dtype bf16 --cuda-graph --no-progress --out "$R/train_graph.jsonl" ;;
    compile) stage compile 240 bench run --models serpent_s --res 256,1024 --dtype bf16,fp32 --compile --no-progress --out "$R/compile.jsonl" ;;
    large) stage large 420 python -m benchmarks.large_images --out "$R/large.jsonl" --deadline-s "$(left 400)" ;;
    *) echo "unknown stage $s" ;;
  esac
done
tar czf "$OUT/run.tgz" -C "$R" . && log "packed $(du -h "$OUT/run.tgz" | cut -f1) into run.tgz"
