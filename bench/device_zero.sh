#!/usr/bin/env bash
# GPU figures for the ZeRO issue, in one call on a lent device (torch there, not our venv):
# DeepSpeed FusedAdam beside torch fused / compiled, and the step inside a ZeRO-2 engine.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
timeout 200 python3 bench/optim_step.py --device cuda --params 5e8 --steps 10 --warmup 3 \
    --out "$OUT/optim_cuda.md" 2>&1 | grep -v "^\[\|WARN"
timeout 120 python3 bench/zero_step_gpu.py --params 5e8 2>&1 | grep -v "^\[\|WARN" | tail -8
