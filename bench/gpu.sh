#!/usr/bin/env bash
# Every GPU measurement, for a session that is lent a GPU (device tool): full-size models with
# seeded random weights (the real compute cost). Each step has a name and its own time limit, and
# a failed step does not stop the others. Results land in bench/results/ (and, when $OUT is set,
# in $OUT/results.tar.gz with the log).
#   bash bench/gpu.sh            # every step, newest questions first (limits add up to ~43 min)
#   bash bench/gpu.sh first      # the steps named in FIRST below: fits one 10-minute device call
#   bash bench/gpu.sh rest       # the others
#   bash bench/gpu.sh NAME ...   # just those steps
#
# The side-by-side steps (compare-*) need the reference checkouts beside the repository, exported
# on a machine that has them (git-ignored; run tool: carry [".refs"]; about 17 MB in all), and their
# Python dependencies as wheels, which this script installs into .refs/site (nothing is downloaded):
#   mkdir -p .refs/moshi .refs/hertz-dev .refs/glm-4-voice/third_party/Matcha-TTS .refs/glm-4-voice/glm-4-voice-9b
#   git -C /path/to/moshi archive e6a55d2 moshi | tar -x -C .refs/moshi        # kyutai-labs/moshi
#   git -C /path/to/hertz-dev archive 076c275 | tar -x -C .refs/hertz-dev      # Standard-Intelligence/hertz-dev
#   git -C /path/to/GLM-4-Voice archive eb00ce9 | tar -x -C .refs/glm-4-voice  # THUDM/GLM-4-Voice, and its submodule:
#   git -C /path/to/Matcha-TTS archive dd9105b | tar -x -C .refs/glm-4-voice/third_party/Matcha-TTS
#   git -C /path/to/GLM-4-Voice-SFT archive 0fc6ca4 model | tar -x --strip-components=1 -C .refs/glm-4-voice/glm-4-voice-9b
#                                     # ^ the glm-4-voice-9b remote code (modeling_chatglm.py), from its public copy
#   cp -r /path/to/mini-omni .refs/mini-omni                                    # gpt-omni/mini-omni (its *.py)
#   pip download --no-deps -d .refs/wheels lightning lightning-utilities torchmetrics openai-whisper hyperpyyaml \
#       'ruamel.yaml==0.17.40' 'omegaconf==2.3.0' 'antlr4-python3-runtime==4.9.3' conformer diffusers hydra-core \
#       gdown beautifulsoup4 soupsieve wget
# Without a checkout its step says so and is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/gpu_log.txt
: >"$LOG"
FIRST="moshi-duplex glm-int4-engine glm-int4-latency glm-decoder-graphs mini-omni-graphs"
case "${1:-all}" in
    all) WANTED=all ;;
    first) WANTED=" $FIRST " ;;
    rest) WANTED=rest ;;
    *) WANTED=" $* " ;;
esac
wanted() {
    case "$WANTED" in
        all) return 0 ;;
        rest) [[ " $FIRST " != *" $1 "* ]] ;;
        *) [[ "$WANTED" == *" $1 "* ]] ;;
    esac
}
step() {  # step NAME SECONDS command...
    local name=$1 limit=$2; shift 2
    wanted "$name" || return 0
    echo "=== $(date +%T) [$name] $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== [$name] exit $? after limit ${limit}s" | tee -a "$LOG"
}
reference_step() {  # reference_step NAME SECONDS MARKER command...: skipped without the checkout
    local name=$1 limit=$2 marker=$3; shift 3
    if [ -f "$marker" ]; then
        step "$name" "$limit" env PYTHONPATH=".refs/site:${PYTHONPATH:-}" "$@"
    elif wanted "$name"; then
        echo "=== [$name] skipped: no $marker (see the top of bench/gpu.sh)" | tee -a "$LOG"
    fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
if [ -d .refs/wheels ] && [ ! -d .refs/site ]; then  # the references' dependencies, from the carried wheels only
    pip install -q --no-deps --no-index --no-build-isolation --target .refs/site .refs/wheels/* >>"$LOG" 2>&1 \
        || echo "=== installing .refs/wheels failed (see the log)" | tee -a "$LOG"
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

# -- FIRST: the open questions of #16 and #14 ----------------------------------------------------
# Moshi duplex steps (#16): ms per 80 ms step for 1, 8 and 32 sessions at full size (7.7B, bf16,
# seeded random weights built on the host first: about a minute); 32 sessions' caches take ~50 GB;
# the CUDA graphs (the default: the temporal step, and the depth transformer's codebooks with their
# draws) beside exact eager steps (--eager-too: times, and the audio's largest difference)
step moshi-duplex 180 python bench/duplex.py --model moshi --device cuda --dtype bfloat16 --sessions 1 8 32 --eager-too
# GLM-4-Voice on a 12 GB card (#14 item 4): the int4 LLM drawn and packed layer by layer under an
# 11.5 GiB cap (a 12 GB card less its CUDA context), its token agreement with the same network in
# bf16 (built, run and freed before the cap), then the whole model's TTFA under the same cap
step glm-int4-engine 120 python bench/glm4_engine.py --device cuda --dtype int4 --batches 1 4 --agreement-steps 64 \
    --memory-limit-gib 11.5
step glm-int4-latency 100 python bench/latency.py --model glm-4-voice --size full --device cuda --dtype int4 --repeats 3 \
    --memory-limit-gib 11.5
# GLM-4-Voice's decoder blocks (#14 item 2): flow passes replayed as CUDA graphs (from the third
# stream on) beside eager, per block, and the largest sample difference between the two
step glm-decoder-graphs 90 python bench/glm4_decoder.py --size full --device cuda --dtype bfloat16 --tokens 200 \
    --modes seamless --schedules "10,25,50,100,150,200" --repeats 3 --eager-too --no-seed-baseline
# Mini-Omni decode steps through zoo.core.graphs: CUDA graphs vs eager, identical tokens, host syncs
step mini-omni-graphs 75 python bench/decode_graphs.py --device cuda --size full --dtype float32 --batches 1 8 32

# -- the rest --------------------------------------------------------------------------------------
# Side by side with each reference (#14 item 7; one process, same weights, one table per model)
reference_step compare-moshi 240 .refs/moshi/moshi/moshi/models/lm.py python bench/compare.py --model moshi \
    --reference .refs/moshi --size full --device cuda --dtype bfloat16 --repeats 3 --steps 40 --sessions 1 8 32 \
    --sweep-steps 10
# Hertz-dev: 0.625 GiB of caches a session at the server's 1024-position context
reference_step compare-hertz-dev 300 .refs/hertz-dev/model.py python bench/compare.py --model hertz-dev \
    --reference .refs/hertz-dev --size full --device cuda --dtype bfloat16 --repeats 2 --steps 160 --sessions 1 8 32 48
# GLM-4-Voice: model_server.py's generate loop (the glm-4-voice-9b remote code) and web_demo.py's decoder
# blocks beside our engine and decoder
reference_step compare-glm-4-voice 180 .refs/glm-4-voice/glm-4-voice-9b/modeling_chatglm.py python bench/compare.py \
    --model glm-4-voice --reference .refs/glm-4-voice --size full --device cuda --dtype bfloat16 --repeats 3 \
    --steps 120 --sessions 1 8 32 64
reference_step compare-mini-omni 120 .refs/mini-omni/inference.py python bench/compare.py --model mini-omni \
    --reference .refs/mini-omni --size full --device cuda --repeats 2 --steps 40 --sessions 1 8 32 64
# Moshi in int8 (the reference's q8 repos, or dtype int8; bitsandbytes on a GPU): the tiny q8 folder's rows as
# loaded against the file's (exact?) and its greedy tokens against the CPU's; then full-size steps under the
# graphs beside eager, and the peak memory (the reference: "Q8, full context: 12GB")
step moshi-q8 60 python bench/moshi_q8.py --device cuda
step moshi-int8-duplex 200 python bench/duplex.py --model moshi --device cuda --dtype int8 --sessions 1 8 32 --eager-too
# Mini-Omni2 (vision, #15): TTFA, steady RTF and the decode step with and without an image in one
# run (the image's CLIP encoding and its longer prompt), stages including image_encode/image_prefill
step mini-omni2-latency 90 python bench/latency.py --model mini-omni2 --size full --device cuda --dtype bfloat16 \
    --repeats 5 --image demos/images/red_circle.png
# A burst: 32 and 64 clients at once against server.py (batched prefill of arrivals, graphs)
step load-burst 120 python bench/load.py --spawn --full --dtype bfloat16 --clients 32 64 --requests-per-client 1 \
    --max-tokens 100
# Chunked prefill: how long a 120 s question stalls 8 GLM-4-Voice sessions already speaking, with
# no bound, 512 and 2048 (server.py's default) prompt positions between two steps
step prefill-stall 150 python bench/prefill_stall.py --model glm-4-voice --size full --device cuda --dtype bfloat16 \
    --running 8 --bounds 0 512 2048
# Mini-Omni stages (prefill: one forward for both rows on a GPU) and Hertz-dev duplex (graphs)
step mini-omni-latency 75 python bench/latency.py --model mini-omni --size full --device cuda --dtype bfloat16 --repeats 5
# Mini-Omni int8 (bitsandbytes on a GPU; measured on CPU only so far): does it run under the decode graphs, and how fast
step mini-omni-int8 75 python bench/latency.py --model mini-omni --size full --device cuda --dtype int8 --repeats 3
step hertz-duplex 150 python bench/duplex.py --model hertz-dev --device cuda --dtype bfloat16 --sessions 1 8 32 48 64
# Hertz-dev's blocks in int8 (bitsandbytes; on a CPU measured): steps under the graphs beside eager, peak memory
step hertz-int8-duplex 150 python bench/duplex.py --model hertz-dev --device cuda --dtype int8 --sessions 1 8 32 --eager-too
# GLM-4-Voice: decode steps over 1..32 sessions (graphs vs eager, padded to batch buckets)
step glm-engine 100 python bench/glm4_engine.py --device cuda --dtype bfloat16 --batches 1 5 32
# Measured on 2026-12-04 and unchanged since (run by hand when needed):
#   bench/latency.py --model glm-4-voice ... (bf16), bench/glm4_engine.py --dtype int8,
#   bench/latency.py --model hertz-dev ...

if [ -n "${OUT:-}" ]; then
    git ls-files --others --exclude-standard bench/results | tar czf "$OUT/results.tar.gz" -T - 2>>"$LOG"
    git diff --name-only bench/results | tar czf "$OUT/changed.tar.gz" -T - 2>>"$LOG"
fi
