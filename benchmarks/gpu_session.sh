#!/usr/bin/env bash
# The GPU work of one session on one H200, as a few device calls that each fit 600 s. From the
# repo root, after ../shared/gpu/stage.sh:
#     STAGES="tests serpent baselines" bash benchmarks/gpu_session.sh
# (.gpu/ is git-ignored: the device tool must be told to carry it, or setup finds nothing.
# Calling .gpu/setup.sh by hand builds mamba-ssm unless .gpu/src is moved away as NO_MAMBA does.)
# Results collect in /tmp/r (kept while the machine stays warm between calls); at the end of
# every call all of it is packed into $OUT/run.tgz (the device tool returns at most 8 files),
# plus the call's log. A stage that finished in an earlier warm call is not run again.
#   serpent    benchmarks.serpent_kernels: fused vs mamba vs chunked correctness, kernels per
#              forward, eager vs CUDA-graph latency, torch.compile (issue 12)
#   baselines  benchmarks.baseline_formulations: each baseline vs its official formulation
#              (issue 13); baselines2 goes on where it stopped
#   tests      the GPU-marked tests (mamba vs chunked vs fused scan, kernel counts)
#   overhead   benchmarks.sweep_overhead: per-config overhead by phase, and the wall time of
#              the main command (issue 15)
#   main       the main command; main2 runs it again (issue 12 wants two runs that agree within
#              2% and rise with resolution)
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
# NO_MAMBA=1: leave mamba-ssm's kernel out (its compile takes ~170 s of a fresh machine) for
# stages that do not need it; Serpent then runs its fused Triton path, MambaIR the chunked scan
if [[ "${NO_MAMBA:-0}" == 1 && -d .gpu/src ]]; then mv .gpu/src .gpu/src.off; fi
source .gpu/setup.sh > "$R/setup.log" 2>&1
tail -n 2 "$R/setup.log"; log "setup"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$R/gpus.csv"
echo "${BENCH_GIT_COMMIT:-unknown}" > "$R/commit.txt"  # the tree travels without .git

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

dl() { echo $(( $(left "$1") - 15 )); }  # a script's own deadline inside its stage's limit
for s in ${STAGES:-serpent}; do
  case $s in
    serpent) stage serpent "${SERPENT_S:-420}" python -m benchmarks.serpent_kernels --out "$R/serpent" --paths "${SERPENT_PATHS:-new,old}" --deadline-s "$(dl "${SERPENT_S:-420}")" ;;
    baselines) stage baselines "${BASELINES_S:-300}" python -m benchmarks.baseline_formulations --out "$R/baselines" --models "${BASELINE_MODELS:-restormer,nafnet_w64,nafnet_w32,swinir,mambair}" --deadline-s "$(dl "${BASELINES_S:-300}")" ;;
    baselines2) stage baselines2 300 python -m benchmarks.baseline_formulations --out "$R/baselines2" --resume "$R/baselines/rows.jsonl" --deadline-s "$(dl 300)" ;;
    overhead) stage overhead 200 python -m benchmarks.sweep_overhead --out "$R/overhead" ;;
    main) stage main 150 bench run --models serpent,swinir --res 256,512,1024 --no-progress --out "$R/main.jsonl" ;;
    main2) stage main2 150 bench run --models serpent,swinir --res 256,512,1024 --no-progress --out "$R/main2.jsonl" ;;
    timer) stage timer 120 python -m benchmarks.timer_check --out "$R/timer_check.jsonl" --rounds 4 --iters 30 --models serpent_s ;;
    graphtrain) stage graphtrain 150 bench run --models all --res 256 --mode train --dtype bf16 --cuda-graph --no-progress --out "$R/train_graph.jsonl" ;;
    compile) stage compile 200 bench run --models serpent_s --res 256 --dtype bf16 --compile --no-progress --out "$R/compile.jsonl" ;;
    tests) stage tests 90 python -m pytest -q -m gpu tests -p no:cacheprovider ;;
    large) stage large 420 python -m benchmarks.large_images --out "$R/large.jsonl" --deadline-s "$(dl 420)" ;;
    *) echo "unknown stage $s" ;;
  esac
done
tar czf "$OUT/run.tgz" -C "$R" . && log "packed $(du -h "$OUT/run.tgz" | cut -f1) into run.tgz"
