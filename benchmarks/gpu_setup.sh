# Sourced by the gpu_*.sh scripts: output folder R, environment, one deadline for all steps
# (`timeout $(left N)` gives at most N seconds, less near the deadline), staged setup.
set -u
R="${OUT:-results/gpu}"
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SERPENT_BENCH_DATA="${SERPENT_BENCH_DATA:-$PWD/.gpu/data}"
t0=$SECONDS
DEADLINE=${DEADLINE:-575}  # the device tool stops a command at 600 s
left() { local l=$(( DEADLINE - SECONDS + t0 )); (( l > $1 )) && echo "$1" || echo $(( l > 5 ? l : 5 )); }
source .gpu/setup.sh > "$R/setup.log" 2>&1
tail -n 3 "$R/setup.log"; echo "setup: $((SECONDS - t0)) s"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$R/gpus.csv"
