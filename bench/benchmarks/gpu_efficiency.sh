#!/usr/bin/env bash
# GPU reference run (efficiency), as the committed results were produced.
# On a machine with several GPUs, from the repo root, after ../shared/gpu/stage.sh:
#     OUT=/some/dir [RESUME_FROM=earlier/sweep.jsonl] bash bench/benchmarks/gpu_efficiency.sh
# 1. set up (staged wheels, mamba-ssm kernel); 2. the timer check and 3. the regression-gate
# demo, each alone on GPU 0 (run 2 ran the demo beside the sweep: the CPU load of the sweep's
# workers moved a launch-bound model's latency by 15% and gave a false alarm); 4. the sweep of
# every model at 256/512/1024, infer+train, bf16+fp32, sharded over all GPUs (each config in a
# fresh process, most expensive first); 5. SwinIR's official math attention path, and which
# SDPA kernels SwinIR gets.
# RESUME_FROM: an earlier sweep on the same kind of card; its configs are not measured again
# (error rows are retried). Every step has a time limit: the device tool stops a command at 600 s.
source bench/benchmarks/gpu_setup.sh
MODELS="${MODELS:-serpent_t,serpent_s,serpent_b,nafnet_w32,nafnet_w64,restormer,swinir,mambair}"
ngpu=$(nvidia-smi -L | wc -l)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
# an earlier sweep counts only on the same kind of card; elsewhere everything is measured here
if [[ -n "${RESUME_FROM:-}" ]] && grep -q "\"device_name\": \"$card\"" "$RESUME_FROM"; then
  cp "$RESUME_FROM" "$R/sweep.jsonl"
fi

CUDA_VISIBLE_DEVICES=0 timeout $(left 100) python -m bench.benchmarks.timer_check --out "$R/checks.jsonl" > "$R/timer_check.log" 2>&1
cat "$R/timer_check.log"; echo "timer check: $((SECONDS - t0)) s"

CUDA_VISIBLE_DEVICES=0 timeout $(left 150) python -m bench.benchmarks.regression_demo --out-dir "$R/regression" > "$R/regression.log" 2>&1
tail -n 4 "$R/regression.log"; echo "regression demo: $((SECONDS - t0)) s"
timeout $(left 330) bench run --models "$MODELS" --res 256,512,1024 --mode both --dtype bf16,fp32 \
    --warmup 3 --iters 10 --min-time 0.2 --gpus all --resume --timeout 150 --no-progress \
    --out "$R/sweep.jsonl" > "$R/sweep.log" 2>&1
echo "sweep: $((SECONDS - t0)) s"; tail -n 12 "$R/sweep.log"
others=$(seq -s, 1 $((ngpu - 1))); [[ -z "$others" ]] && others=0

CUDA_VISIBLE_DEVICES=0 timeout $(left 60) python -m bench.benchmarks.attention_paths --out "$R/checks.jsonl" \
    --models swinir:denoise:1 --res 256,512 --dtypes bf16 --iters 20 > "$R/attention_paths.log" 2>&1 &
timeout $(left 60) bench run --models swinir --res 256,512 --mode both --dtype bf16,fp32 --set attn_impl=math \
    --warmup 3 --iters 10 --min-time 0.2 --gpus "$others" --resume --timeout 60 --no-progress \
    --out "$R/sweep.jsonl" >> "$R/sweep.log" 2>&1
wait
grep -v Warning "$R/attention_paths.log" | grep -v "^  " | tail -n 8; echo "done: $((SECONDS - t0)) s"
