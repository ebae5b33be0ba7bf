#!/usr/bin/env bash
# Every GPU measurement in one run, for a session that is lent a GPU (device tool): full-size
# models with seeded random weights (the real compute cost). Each step has its own time limit and
# a failed step does not stop the others. Results land in bench/results/ (and, when $OUT is set,
# in $OUT/results.tar.gz with the log).
#   bash bench/gpu.sh            # about 10 minutes on an H100/H200 (each step's limit below)
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

# Newest questions first: #16 (Moshi), GLM-4-Voice int4 (#14), #15 (Mini-Omni2), then the rest of
# #14 and the rows that track earlier issues. The limits add up to about 16 minutes, more than one 10-minute device call: a
# call that runs out loses only the last (oldest) rows; the usual run is shorter.
# Moshi duplex steps (#16): ms per 80 ms step for 1, 8 and 32 sessions at full size (7.7B, bf16,
# seeded random weights built on the host first: about a minute); 32 sessions' caches take ~50 GB;
# the temporal transformer's CUDA graphs (the default) beside exact eager steps (--eager-too)
step 180 python bench/duplex.py --model moshi --device cuda --dtype bfloat16 --sessions 1 8 32 --eager-too
# GLM-4-Voice on a 12 GB card (#14 item 4): the int4 LLM drawn and packed layer by layer under an
# 11.5 GiB cap (a 12 GB card less its CUDA context), its token agreement with the same network in
# bf16 (built, run and freed before the cap), then the whole model's TTFA under the same cap
step 120 python bench/glm4_engine.py --device cuda --dtype int4 --batches 1 4 --agreement-steps 64 --memory-limit-gib 11.5
step 100 python bench/latency.py --model glm-4-voice --size full --device cuda --dtype int4 --repeats 3 --memory-limit-gib 11.5
# Mini-Omni2 (vision, #15): TTFA, steady RTF and the decode step with and without an image in one
# run (the image's CLIP encoding and its longer prompt), stages including image_encode/image_prefill
step 90 python bench/latency.py --model mini-omni2 --size full --device cuda --dtype bfloat16 --repeats 5 \
    --image demos/images/red_circle.png
# Mini-Omni decode steps through zoo.core.graphs: CUDA graphs vs eager, identical tokens, host syncs
step 75 python bench/decode_graphs.py --device cuda --size full --dtype float32 --batches 1 8 32
# Side by side with the reference (one process, same weights). Needs a checkout of the reference
# and its Python dependencies beside the repository, prepared on a machine with network access:
#   mkdir -p .refs && cp -r /path/to/mini-omni .refs/mini-omni
#   pip install --no-deps --target .refs/site lightning lightning-utilities torchmetrics openai-whisper
# and carried to the GPU machine (run tool: carry [".refs"]). Without them the step says so and is skipped.
if [ -f .refs/mini-omni/inference.py ]; then
    step 120 env PYTHONPATH=".refs/site:${PYTHONPATH:-}" python bench/compare.py --model mini-omni \
        --reference .refs/mini-omni --size full --device cuda --repeats 2 --steps 40 --sessions 1 8 32 64
else
    echo "=== skipped bench/compare.py: no .refs/mini-omni (see the comment above)" | tee -a "$LOG"
fi
# A burst: 32 and 64 clients at once against server.py (batched prefill of arrivals, graphs)
step 120 python bench/load.py --spawn --full --dtype bfloat16 --clients 32 64 --requests-per-client 1 --max-tokens 100
# Mini-Omni stages (prefill: one forward for both rows on a GPU) and Hertz-dev duplex (graphs)
step 75 python bench/latency.py --model mini-omni --size full --device cuda --dtype bfloat16 --repeats 5
step 90 python bench/duplex.py --model hertz-dev --device cuda --dtype bfloat16 --sessions 1 8 32
# GLM-4-Voice: decode steps over 1..32 sessions (graphs vs eager, now padded to batch buckets)
step 100 python bench/glm4_engine.py --device cuda --dtype bfloat16 --batches 1 5 32
# Measured on 2026-12-04 and unchanged by #14 (run by hand when needed):
#   bench/latency.py --model glm-4-voice ... (bf16), bench/glm4_decoder.py, bench/glm4_engine.py --dtype int8,
#   bench/latency.py --model hertz-dev ...

if [ -n "${OUT:-}" ]; then
    git ls-files --others --exclude-standard bench/results | tar czf "$OUT/results.tar.gz" -T - 2>>"$LOG"
    git diff --name-only bench/results | tar czf "$OUT/changed.tar.gz" -T - 2>>"$LOG"
fi
