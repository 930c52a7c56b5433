#!/usr/bin/env bash
# GPU reference run, part 1 (efficiency), exactly as committed results were produced.
# On a GPU machine with several GPUs, from the repo root, after ../shared/gpu/stage.sh:
#     OUT=/some/dir bash bench/benchmarks/gpu_efficiency.sh
# 1. set up (staged wheels, mamba-ssm kernel); 2. correctness and timer checks, one GPU each, at
# the same time; 3. the sweep of every model at 256/512/1024, infer+train, bf16+fp32, sharded
# over all GPUs (each config in a fresh process), plus SDPA-vs-math rows for the attention models.
set -u
MODELS="${MODELS:-serpent_t,serpent_s,serpent_b,swinir,restormer,nafnet_w32,nafnet_w64,mambair}"
R="${OUT:-results/gpu}"
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$SECONDS
source .gpu/setup.sh > "$R/setup.log" 2>&1
cat "$R/setup.log" | tail -3
echo "setup: $((SECONDS - t0)) s"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$R/gpus.csv"
ngpu=$(nvidia-smi -L | wc -l)
gpu() { echo $(( $1 % ngpu )); }
DEADLINE=${DEADLINE:-570}  # seconds from start: the device tool stops a command at 600
left() { local l=$(( DEADLINE - SECONDS + t0 )); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }

CUDA_VISIBLE_DEVICES=$(gpu 0) timeout $(left 150) python -m bench.benchmarks.scan_gpu --out "$R/checks.jsonl" > "$R/scan_gpu.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$(gpu 1) timeout $(left 150) python -m bench.benchmarks.timer_check --out "$R/checks.jsonl" > "$R/timer_check.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$(gpu 2) timeout $(left 150) python -m bench.benchmarks.attention_paths --out "$R/checks.jsonl" --res 256,512 --dtypes bf16 --iters 20 > "$R/attention_paths.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$(gpu 3) timeout $(left 150) python -m bench.benchmarks.regression_demo --out-dir "$R/regression" > "$R/regression.log" 2>&1 &
wait
echo "checks: $((SECONDS - t0)) s"
tail -n 12 "$R"/scan_gpu.log "$R"/timer_check.log "$R"/attention_paths.log "$R"/regression.log

common=(--gpus all --mode both --dtype bf16,fp32 --no-progress --timeout 200)
timeout $(left 170) bench run --models "$MODELS" --res 256,512 --warmup 5 --iters 20 --min-time 0.5 \
    --out "$R/sweep.jsonl" "${common[@]}" > "$R/sweep.log" 2>&1
echo "sweep 256/512: $((SECONDS - t0)) s"
timeout $(left 150) bench run --models "$MODELS" --res 1024 --warmup 2 --iters 10 --min-time 0 \
    --out "$R/sweep.jsonl" "${common[@]}" >> "$R/sweep.log" 2>&1
echo "sweep 1024: $((SECONDS - t0)) s"
timeout $(left 60) bench run --models swinir,restormer --res 256,512 --warmup 5 --iters 20 --min-time 0.5 \
    --set attn_impl=math --out "$R/sweep.jsonl" "${common[@]}" >> "$R/sweep.log" 2>&1
echo "math path: $((SECONDS - t0)) s"
tail -n 5 "$R/sweep.log"
