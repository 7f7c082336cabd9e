#!/usr/bin/env bash
# The GPU figures of issue #17 in one prepared run, sized to finish in under 10 minutes on one H100/H200:
# training (linear >= 1 M pairs/s at batch 4096, STRUCTURE <= 2x linear, train() vs the bare loop, torch_compile),
# extraction (>= 80% of the bare bf16 forward, >= 6x the plain fp32 loop) and top-k retrieval at 200k x 1M (within 3x
# of the matmul floor). Each script prints its table, with the device name, and writes results/*_gpu.json; copy the
# tables and the device name into RESULTS.md. Run from the repository root in an environment with hf_align installed:
#     bash benchmarks/gpu_figures.sh 2>&1 | tee gpu_figures.log
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
timeout 240 python bench_training.py --device cuda --batch-size 4096 --n-pairs 1000000 --dim 1024 --width 512 \
    --steps 50 --warmup 5 --repeat 2 --methods linear,mlp,codebook,relative,token_relative --compile \
    --results-name training_gpu
timeout 180 python bench_extraction.py --device cuda --n-images 2048 --batch-size 256 --vision-hidden 384 \
    --vision-heads 6 --memory-sizes --repeat 2 --results-name extraction_gpu
timeout 150 python bench_retrieval.py --device cuda --queries 200000 --gallery 1000000 --dim 512 --dtype bfloat16
