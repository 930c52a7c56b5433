#!/usr/bin/env bash
# Multi-GPU scaling (issue 8) on a host with 2 or more GPUs, from the repo root, after
# ../shared/gpu/stage.sh --data Kodak24,Set14,CBSD68 (plus .gpu/data/BSD100_train):
#     OUT=/some/dir bash benchmarks/gpu_scaling.sh
# DDP training throughput on 1, 2 and 4 GPUs at a fixed global batch (strong) and a fixed
# per-GPU batch (weak), on 256 px crops (at 128 px a step is a few ms of GPU work per image and
# the host's launches dominate: run 3 measured strong efficiency 0.39-0.48 there), then the wall
# time of one sweep on 1 GPU vs 2 vs all GPUs (bench run --gpus).
source benchmarks/gpu_setup.sh
timeout $(left 360) python -m benchmarks.ddp_scaling --out "$R/ddp_scaling.jsonl" --parts train \
    --crop 256 --batch 64 --per-gpu-batch 16 --iters 20 --skip 5 --budget-s 330 >> "$R/ddp_scaling.log" 2>&1
echo "train: $((SECONDS - t0)) s"
timeout $(left 200) python -m benchmarks.ddp_scaling --out "$R/ddp_scaling.jsonl" --parts sweep \
    --budget-s 180 >> "$R/ddp_scaling.log" 2>&1
echo "sweep: $((SECONDS - t0)) s"
grep -v "^\s" "$R/ddp_scaling.log" | tail -n 24
