#!/usr/bin/env bash
# GPU reference run (efficiency), as the committed results were produced. On a host with
# several GPUs, from the repo root, after ../shared/gpu/stage.sh:
#     OUT=/some/dir [RESUME_FROM=earlier/sweep.jsonl] bash benchmarks/gpu_efficiency.sh
# Re-entrant: run it again with the same OUT (a warm machine keeps it) and it goes on where the
# device tool's 600 s limit stopped it (checks done once, sweeps resumed). RESUME_FROM: an
# earlier sweep on the same kind of card, whose configs are not measured again.
# Run 4 (4x H200) needed two 600 s calls for steps 1-3 (setup 168 s, checks 365 s, sweep 560 s).
# 1. setup (staged wheels, mamba-ssm kernel);
# 2. checks, once: on GPU 0 alone the timer check, then the regression-gate demo eager and with
#    CUDA graphs (timings of launch-bound models follow the host: nothing else on GPU 0); on
#    GPUs 1-3 meanwhile SDPA vs math attention (one workload each), the GPU tests, scan_gpu;
# 3. the sweep: every model at 256/512/1024, infer+train, bf16+fp32, sharded over all GPUs,
#    each config in a fresh process, most expensive first;
# 4. SwinIR's official math attention as sweep rows (256/512), then the run-to-run check: the
#    256/512 bf16 inference rows measured again (eager), and twice as CUDA graph replays.
source benchmarks/gpu_setup.sh
MODELS="${MODELS:-serpent_t,serpent_s,serpent_b,nafnet_w32,nafnet_w64,restormer,swinir,mambair}"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
if [[ -n "${RESUME_FROM:-}" && ! -f "$R/sweep.jsonl" ]] && grep -q "\"device_name\": \"$card\"" "$RESUME_FROM"; then
  cp "$RESUME_FROM" "$R/sweep.jsonl"  # an earlier sweep counts only on the same kind of card
fi
SWEEP=(--warmup 3 --iters 10 --min-time 0.2 --gpus all --resume --no-progress)
sweep() { local out=$1 limit=$2; shift 2
  timeout $(left "$limit") bench run "${SWEEP[@]}" --timeout 150 --out "$R/$out" "$@" >> "$R/sweep.log" 2>&1
  echo "$out: $((SECONDS - t0)) s, $(wc -l < "$R/$out" 2>/dev/null || echo 0) rows"; }

if [[ ! -f "$R/checks.done" ]]; then
  ( CUDA_VISIBLE_DEVICES=0 timeout $(left 200) python -m benchmarks.timer_check --out "$R/checks.jsonl" \
        --rounds 4 --iters 30 > "$R/timer_check.log" 2>&1
    for g in eager graph; do
      CUDA_VISIBLE_DEVICES=0 timeout $(left 110) python -m benchmarks.regression_demo \
          --out-dir "$R/regression_$g" $([[ $g == graph ]] && echo --cuda-graph) > "$R/regression_$g.log" 2>&1
    done ) &
  i=1
  for w in swinir:denoise:1 swinir:sr:4 restormer:deblur:1; do
    CUDA_VISIBLE_DEVICES=$i timeout $(left 200) python -m benchmarks.attention_paths --out "$R/attention_$i.jsonl" \
        --models $w --res 256,512 --dtypes fp32,bf16 --iters 20 > "$R/attention_$i.log" 2>&1 &
    i=$((i + 1))
  done
  wait
  cat "$R"/attention_*.jsonl > "$R/attention_paths.jsonl"
  ( CUDA_VISIBLE_DEVICES=1 timeout $(left 60) python -m pytest -q -m gpu tests > "$R/gpu_tests.log" 2>&1 ) &
  CUDA_VISIBLE_DEVICES=2 timeout $(left 60) python -m benchmarks.scan_gpu --out "$R/checks.jsonl" \
      > "$R/scan_gpu.log" 2>&1
  wait
  touch "$R/checks.done"
  cat "$R/timer_check.log"; tail -n 1 "$R"/regression_*.log; grep -h "rows ->" "$R"/attention_*.log
  tail -n 1 "$R/gpu_tests.log"; tail -n 3 "$R/scan_gpu.log"; echo "checks: $((SECONDS - t0)) s"
fi

sweep sweep.jsonl 560 --models "$MODELS" --res 256,512,1024 --mode both --dtype bf16,fp32
sweep sweep.jsonl 120 --models swinir --res 256,512 --mode both --dtype bf16,fp32 --set attn_impl=math
sweep repeat_eager.jsonl 120 --models "$MODELS" --res 256,512 --mode infer --dtype bf16
sweep repeat_graph_A.jsonl 120 --models "$MODELS" --res 256,512 --mode infer --dtype bf16 --cuda-graph
sweep repeat_graph_B.jsonl 120 --models "$MODELS" --res 256,512 --mode infer --dtype bf16 --cuda-graph
tail -n 5 "$R/sweep.log"; echo "done: $((SECONDS - t0)) s"
