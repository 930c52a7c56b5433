#!/usr/bin/env bash
# What run 4 left unmeasured (its device time ran out), as one call on a host with 4 GPUs, from
# the repo root, after ../shared/gpu/stage.sh (then gpu_scaling.sh as a second call, warm):
#     OUT=/some/dir bash benchmarks/gpu_followup.sh
# GPU 0: the timer check (Serpent first), alone; GPUs 1-3 meanwhile: the GPU tests, mamba vs the
# chunked scan as it is now (scan_gpu), and one CUDA-graph training step of every model at
# 256 px (bf16; whether capture works on each before the GPU gate sweeps training steps too).
source benchmarks/gpu_setup.sh
CUDA_VISIBLE_DEVICES=0 timeout $(left 300) python -m benchmarks.timer_check --out "$R/checks.jsonl" \
    --rounds 4 --iters 30 > "$R/timer_check.log" 2>&1 &
( CUDA_VISIBLE_DEVICES=1 timeout $(left 60) python -m pytest -q -m gpu tests > "$R/gpu_tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout $(left 90) python -m benchmarks.scan_gpu --out "$R/checks.jsonl" \
      > "$R/scan_gpu.log" 2>&1 ) &
timeout $(left 300) bench run --models all --res 256 --mode train --dtype bf16 --cuda-graph --gpus 2,3 \
    --warmup 3 --iters 10 --min-time 0.2 --timeout 120 --no-progress --out "$R/train_graph.jsonl" \
    > "$R/train_graph.log" 2>&1
wait
cat "$R/timer_check.log"; tail -n 1 "$R/gpu_tests.log"; tail -n 1 "$R/scan_gpu.log"
tail -n 14 "$R/train_graph.log"; echo "done: $((SECONDS - t0)) s"
