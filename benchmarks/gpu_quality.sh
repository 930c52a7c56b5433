#!/usr/bin/env bash
# GPU reference run (quality), as the committed results were produced.
# From the repo root on a 4-GPU machine, after ../shared/gpu/stage.sh --data Kodak24,Set14,CBSD68
# plus .gpu/data/BSD100_train (the 32 BSD100 images that are not in CBSD68):
#     OUT=/some/dir bash benchmarks/gpu_quality.sh
# Same training budget for every model and task (benchmarks.quality_short: iterations,
# crop, batch, lr, data, seed); the four models' runs are spread over the GPUs and each process
# evaluates its models on the same deterministic inputs (Kodak24, Set14, CBSD68).
source benchmarks/gpu_setup.sh
BUDGET=(--iters "${ITERS:-300}" --crop 128 --batch 8 --lr 2e-4 --workers 8 --seed 0
        --train-set BSD100_train --eval-set Kodak24,Set14,CBSD68)
q() {  # q GPU TASKS MODELS
  CUDA_VISIBLE_DEVICES=$1 timeout $(left 420) python -m benchmarks.quality_short "${BUDGET[@]}" \
    --tasks "$2" --models "$3" --runs-dir "/tmp/q$1" --out "$R/quality.jsonl" > "$R/quality_gpu$1.log" 2>&1
}
q 0 deblur swinir & q 1 sr8 swinir & q 2 deblur,sr8 restormer & q 3 deblur,sr8 serpent_s,nafnet &
wait
echo "quality: $((SECONDS - t0)) s"
for f in "$R"/quality_gpu*.log; do tail -n 14 "$f"; done
echo "done: $((SECONDS - t0)) s"
