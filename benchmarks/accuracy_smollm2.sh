#!/usr/bin/env bash
# The README's accuracy tables: SmolLM2-135M-Instruct untuned, and LoRA-MoE with two
# allocations of equal trainable parameters (uniform 5 experts, MoLA "2468": 2/4/6/8 experts
# per layer quarter, 5 on average), 40 SFT steps of 8 questions on CPU, all scored in the
# rc (cloze) formulation on every question not used for training, then `guilomo compare`.
#   bash benchmarks/accuracy_smollm2.sh [SET] [TRAIN] [CUTOFF]
# e.g. arc_easy 300 160 (about 15 minutes on 2 cores), sciq 300 320, piqa 300 160.
set -euo pipefail
data=${1:-arc_easy}
train=${2:-300}
cutoff=${3:-160}
g=".venv/bin/guilomo"
root="runs/acc-$data"
$g stage preprocess --out "$root/data" --datasets "$data" --formulation rc \
  --train-size "$train" --validation-size 30 --overwrite
$g stage allocate --out "$root/alloc-uniform" --preset uniform --experts 5 --overwrite
$g stage allocate --out "$root/alloc-2468" --preset 2468 --overwrite
for a in uniform 2468; do
  $g stage sft --out "$root/adapter-$a" --dataset "$root/data" --allocation "$root/alloc-$a" \
    --max-steps 40 --batch-size 8 --micro-batch-size 8 --lr 1e-3 --warmup-steps 4 \
    --cutoff "$cutoff" --checkpoint-every 10 --quiet
done
$g stage evaluate --out "$root/eval-base" --dataset "$root/data" --batch-size 16
for a in uniform 2468; do
  $g stage evaluate --out "$root/eval-$a" --dataset "$root/data" --adapter "$root/adapter-$a" \
    --batch-size 16
done
$g compare "$root/eval-uniform" "$root/eval-2468"
$g compare "$root/eval-base" "$root/eval-uniform"
