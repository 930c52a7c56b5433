#!/usr/bin/env bash
# Multi-GPU scaling (issue 8) on a machine with 2 or more GPUs, from the repo root, after
# ../shared/gpu/stage.sh --data Kodak24,Set14,CBSD68 (plus .gpu/data/BSD100_train):
#     OUT=/some/dir bash bench/benchmarks/gpu_scaling.sh
# DDP training throughput on 1, 2 (and 4) GPUs at a fixed global batch (strong) and a fixed
# per-GPU batch (weak), then the wall time of one sweep on 1 GPU vs all GPUs (bench run --gpus).
set -u
R="${OUT:-results/gpu}"
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SERPENT_BENCH_DATA="${SERPENT_BENCH_DATA:-$PWD/.gpu/data}"
t0=$SECONDS
DEADLINE=${DEADLINE:-575}
left() { local l=$(( DEADLINE - SECONDS + t0 )); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }
source .gpu/setup.sh > "$R/setup.log" 2>&1
tail -n 3 "$R/setup.log"; echo "setup: $((SECONDS - t0)) s"
for part in train sweep; do
  timeout $(left 190) python -m bench.benchmarks.ddp_scaling --out "$R/ddp_scaling.jsonl" --parts $part \
      >> "$R/ddp_scaling.log" 2>&1
  echo "$part: $((SECONDS - t0)) s"
done
tail -n 20 "$R/ddp_scaling.log"
