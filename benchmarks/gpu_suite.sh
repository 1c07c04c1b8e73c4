#!/usr/bin/env bash
# The GPU checks and figures of docs/BENCHMARKS.md in one go, on one CUDA GPU:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (PYTHON=python3 to choose the interpreter)
# 1. tests/test_cuda.py: fused SDPA kernels, bf16/fp16 against fp32, train.py/test.py on the GPU;
# 2. ViT-B/16, 8 frames, bf16: inference batch 32 (twice, for reproducibility) and 64, training batch 32 (twice)
#    and 64, with and without activation checkpointing, and the data loader at batch 32;
# 3. the torch.compile'd floor and T2L at batch 32 (compilation time reported);
# 4. the end-to-end pipeline: loader with the transform in the workers or on the GPU, test.py's evaluation loop.
# Everything printed goes to OUT_DIR/suite.log as well; every benchmark run also writes OUT_DIR/<run>.json.
set -u -o pipefail
OUT_DIR=${1:-benchmark_out}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0
exec > >(tee "$OUT_DIR/suite.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py || status=1
common=(--size ViT-B/16 --frames 8 --precision bf16 --device cuda --reps 7 --warmup 3)
for run in 1 2; do
  $PY benchmarks/throughput.py "${common[@]}" --batch 32 --train-batch 32 --source-frames 32 \
      --json "$OUT_DIR/b16_bs32_run$run.json" || status=1
done
$PY benchmarks/throughput.py "${common[@]}" --batch 64 --train-batch 64 \
    --contenders floor,t2l,xclip,t2l-classify,xclip-classify,train,train-ckpt \
    --json "$OUT_DIR/b16_bs64.json" || status=1
timeout 150 $PY benchmarks/throughput.py "${common[@]}" --batch 32 --contenders floor,t2l --compile \
    --json "$OUT_DIR/b16_bs32_compile.json" || status=1
# 4. issue 19: the data pipeline with the transform in the workers and on the GPU, and test.py's evaluation loop from
#    frame folders (both test rules) next to the model-only rate, 16 loader workers.
for rules in published centre; do
  $PY benchmarks/throughput.py "${common[@]}" --batch 32 --train-batch 32 --workers 16 --test-rules $rules \
      --contenders t2l,loader,loader-device,test-e2e --json "$OUT_DIR/b16_e2e_$rules.json" || status=1
done
# train.py's own epoch (bf16, transform on the GPU) next to the model-only training step, batch 32, 16 workers.
$PY benchmarks/throughput.py "${common[@]}" --batch 32 --train-batch 32 --workers 16 --loader-videos 2048 \
    --contenders train,loader-device,train-e2e --json "$OUT_DIR/b16_train_e2e.json" || status=1
exit $status
