#!/usr/bin/env bash
# The README's accuracy table: SmolLM2-135M-Instruct, untuned vs LoRA-MoE (uniform, MoLA 2468),
# 40 SFT steps of 8 questions on CPU, generation accuracy on 100 held-out questions.
#   bash benchmarks/accuracy_smollm2.sh [arc_easy|sciq] [CUTOFF]     (12 minutes for ARC-Easy, about 20 for SciQ, on 2 cores)
set -euo pipefail
data=${1:-arc_easy}
cutoff=${2:-160}
g=".venv/bin/guilomo"
root="runs/acc-$data"
$g stage preprocess --out "$root/data" --datasets "$data" --max-train 400 --max-eval 100 --overwrite
$g stage allocate --out "$root/alloc-uniform" --preset uniform --experts 4 --overwrite
$g stage allocate --out "$root/alloc-2468" --preset 2468 --overwrite
for a in 2468 uniform; do
  $g stage sft --out "$root/adapter-$a" --dataset "$root/data" --allocation "$root/alloc-$a" \
    --max-steps 40 --batch-size 8 --micro-batch-size 8 --lr 1e-3 --warmup-steps 4 \
    --cutoff "$cutoff" --checkpoint-every 10 --quiet
done
for mode in generate loglik; do
  $g stage evaluate --out "$root/eval-base-$mode" --dataset "$root/data" --mode "$mode" \
    --batch-size 16 --max-new-tokens 12
  for a in uniform 2468; do
    $g stage evaluate --out "$root/eval-$a-$mode" --dataset "$root/data" --adapter "$root/adapter-$a" \
      --mode "$mode" --batch-size 16 --max-new-tokens 12
  done
done
