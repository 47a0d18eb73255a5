#!/usr/bin/env bash
# The GPU checks, in one call on a lent device (torch there, not our venv):
#   bash bench/device_check.sh        (with .whl/ holding tyro and its pure-Python deps)
# Writes under $OUT: log, optim_cuda.md, pytest output.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, accelerate, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'accelerate', accelerate.__version__)"
mem=$(python3 -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
params=$([ "$mem" -gt 100 ] && echo 1.01e9 || echo 5e8)
timeout 240 python3 bench/optim_step.py --device cuda --params "$params" --steps 10 --warmup 3 \
    --out "$OUT/optim_cuda.md"
timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -x --durations=5 \
    2>&1 | tail -30
