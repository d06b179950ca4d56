#!/usr/bin/env bash
# The device checks of one GPU session, in one go (see README "GPU checks"): the preflight of the
# debug and FP8 recipes first, then GPU tests, the 1-GPU debug training run through Megatron's
# trainer, and the throughput benchmark.
# Usage on a GPU machine with our wheels in .whl/ (no network):  OUT=/some/dir bash benchmarks/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/acmoe_gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)" | tee -a "$OUT/gpu.txt"
# First minutes of any GPU machine: the preflight verdict of the debug recipe and of the FP8 recipe
# (environment, fused paths, FP8 GEMM error against BF16, memory against this GPU, the shrunk model's
# steps, checkpoint and TensorBoard round trips); each report lands in $OUT/preflight_*/.
echo "== preflight configs/gpu_debug.yaml"
timeout ${PREFLIGHT_TIMEOUT:-240} python3 -m acmoe_megatron.cli.preflight --config configs/gpu_debug.yaml --nproc 1 \
  --out "$OUT/preflight_gpu_debug" --timeout 200 run.dir=/tmp/pf_gpu_debug data.path=/tmp/gpu_data 2>&1 | tail -20
echo "== preflight configs/gpu_fp8_te.yaml"
timeout ${PREFLIGHT_TIMEOUT:-240} python3 -m acmoe_megatron.cli.preflight --config configs/gpu_fp8_te.yaml --nproc 1 \
  --out "$OUT/preflight_gpu_fp8_te" --timeout 200 run.dir=/tmp/pf_gpu_fp8 data.path=/tmp/gpu_data 2>&1 | tail -20
echo "== GPU tests"; timeout 150 python3 -m pytest tests/gpu -m gpu -q -ra -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
# With Transformer Engine (benchmarks/gpu_te_setup.sh): grouped-GEMM experts, BF16 and FP8.
if python3 -c "import transformer_engine.pytorch" 2>/dev/null; then
  BENCH_ARGS=${BENCH_ARGS:---te --precisions bf16,fp8 --shapes 2048x5632x8,4096x14336x8}
else
  BENCH_ARGS=${BENCH_ARGS:-}
fi
echo "== throughput ($BENCH_ARGS)"; timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/gpu_throughput.py $BENCH_ARGS --out "$OUT/gpu_throughput.md" 2>&1 | grep -v Warning | tail -40 | tee "$OUT/bench.log"
echo "== 1-GPU training run"; timeout ${TRAIN_TIMEOUT:-150} python3 -m acmoe_megatron.cli.pretrain --config configs/gpu_debug.yaml --nproc 1 run.dir=/tmp/gpu_run data.path=/tmp/gpu_data > "$OUT/train.log" 2>&1; echo "train rc=$?"
grep -E "iteration +[0-9]+/|validation loss|run summary|Error|error:" "$OUT/train.log" | cut -c1-330 | tail -20
cp /tmp/gpu_run/summary.json "$OUT/train_summary.json" 2>/dev/null || true
