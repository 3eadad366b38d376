#!/usr/bin/env bash
# The GPU check of airvae (running time not measured yet): the suite's CUDA tests, then stacked
# training throughput against the device's matmul ceiling, evaluation rates, and the projected wall
# time of `airvae reproduce table1 --budget paper` per dataset. Writes benchmarks/gpu_check.json.
#   bash benchmarks/gpu_check.sh            (from anywhere; the PyTorch in PATH must be a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== CUDA tests"
timeout 180 python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
echo "== throughput"
timeout 330 python benchmarks/gpu_check.py --device cuda --compile --out benchmarks/gpu_check.json "$@"
