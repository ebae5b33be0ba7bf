#!/usr/bin/env bash
# Every GPU measurement in one run, for a session that is lent a GPU (device tool): full-size
# Mini-Omni with random weights (the real compute cost). Results land in bench/results/.
#   bash bench/gpu.sh        # about 6-8 minutes on an H100
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python bench/latency.py --size full --device cuda --dtype bfloat16 --repeats 5
python bench/latency.py --size full --device cuda --dtype float32 --repeats 5
python bench/load.py --spawn --full --device cuda --dtype bfloat16 --clients 1 16 64 \
    --requests-per-client 2 --max-tokens 120 --timeout 240
