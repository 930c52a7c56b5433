#!/usr/bin/env bash
# Multi-GPU scaling (issue 8) on a machine with 2 or more GPUs, from the repo root, after
# ../shared/gpu/stage.sh --data Kodak24,Set14,CBSD68 (plus .gpu/data/BSD100_train):
#     OUT=/some/dir bash bench/benchmarks/gpu_scaling.sh
# DDP training throughput on 1, 2 (and 4) GPUs at a fixed global batch (strong) and a fixed
# per-GPU batch (weak), then the wall time of one sweep on 1 GPU vs all GPUs (bench run --gpus).
source bench/benchmarks/gpu_setup.sh
for part in train sweep; do
  timeout $(left 190) python -m bench.benchmarks.ddp_scaling --out "$R/ddp_scaling.jsonl" --parts $part \
      >> "$R/ddp_scaling.log" 2>&1
  echo "$part: $((SECONDS - t0)) s"
done
tail -n 20 "$R/ddp_scaling.log"
