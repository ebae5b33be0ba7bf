#!/usr/bin/env bash
# Every GPU measurement in one run, for a session that is lent a GPU (device tool): full-size
# models with seeded random weights (the real compute cost). Each step has its own time limit and
# a failed step does not stop the others. Results land in bench/results/ (and, when $OUT is set,
# in $OUT/results.tar.gz with the log).
#   bash bench/gpu.sh            # about 7-9 minutes on an H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/gpu_log.txt
: >"$LOG"
step() {  # step SECONDS command...
    local limit=$1; shift
    echo "=== $(date +%T) $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== exit $? after limit ${limit}s" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

# GLM-4-Voice: decode steps over 1..32 sessions (graphs vs eager), then the whole pipeline
step 150 python bench/glm4_engine.py --device cuda --dtype bfloat16 --batches 1 4 8 16 32
step 150 python bench/latency.py --model glm-4-voice --size full --device cuda --dtype bfloat16 --repeats 3 --reply-steps 60
step 60 python bench/glm4_decoder.py --device cuda --dtype float32 --size full
# GLM-4-Voice quantised: memory and decode speed
step 120 python bench/glm4_engine.py --device cuda --dtype int4 --batches 1 4 --no-eager
step 120 python bench/glm4_engine.py --device cuda --dtype int8 --batches 1 4 --no-eager
# Hertz-dev: per-frame stages and concurrent duplex sessions
step 120 python bench/latency.py --model hertz-dev --size full --device cuda --dtype bfloat16 --repeats 3
step 90 python bench/hertz_duplex.py --device cuda --dtype bfloat16 --sessions 1 2 4 8
# Mini-Omni (issue #2's GPU rows)
step 90 python bench/latency.py --model mini-omni --size full --device cuda --dtype bfloat16 --repeats 5

if [ -n "${OUT:-}" ]; then
    git ls-files --others --exclude-standard bench/results | tar czf "$OUT/results.tar.gz" -T - 2>>"$LOG"
    git diff --name-only bench/results | tar czf "$OUT/changed.tar.gz" -T - 2>>"$LOG"
fi
