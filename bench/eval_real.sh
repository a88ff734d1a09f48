#!/usr/bin/env bash
# RAG, fine-tuning or both, measured on a real model: the README's four-mode table and chart.
#
# 1. index the labelled plant corpus (bench/data/plant/corpus);
# 2. rag-data: chat rows with query's exact RAG prompt from the TRAIN half of the questions;
# 3. train a QLoRA adapter on them (NF4 base), sized for minutes on a shared 2-core CPU;
# 4. eval on the HELD-OUT half: rag and ft+rag first (the comparison that matters), then base and ft
#    (the second eval resumes the first: the rows already answered are kept).
# The reports land in bench/results/eval_real/ (report.json, report.md, report.png, answers.jsonl, run.json).
#
# On a shared 2-core CPU a RAG answer took about a minute, so the whole held-out half (52 questions x 4 modes)
# takes hours: HELDOUT_FIRST=N evaluates the first N held-out questions only, MODES=... picks the modes
# (default: rag and ft+rag, then all four).
#
# Usage: bench/eval_real.sh [MODEL_DIR]   (default: SmolLM2-135M-Instruct converted to Phi-3 layout by
#        `phi3fast convert`, as `make demo` caches it in ~/.cache/phi3fast). WORK=/path keeps the index and adapter elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${DEMO_CACHE:-$HOME/.cache/phi3fast}/smollm2-135m-instruct-phi3}
WORK=${WORK:-/tmp/phi3fast-eval-real}
RESULTS=bench/results/eval_real
DATA=bench/data/plant
PHI3FAST=${PHI3FAST:-.venv/bin/phi3fast}
K=3
mkdir -p "$WORK" "$RESULTS"

# 128-token chunks keep the 3-passage prompt near 450 tokens: affordable to train on and to prefill on a CPU.
[ -f "$WORK/index/MANIFEST.json" ] ||
    $PHI3FAST index "$DATA/corpus" --out "$WORK/index" --chunk-tokens 128 --overlap 16
[ -f "$WORK/rag_train.jsonl" ] ||
    $PHI3FAST rag-data --index "$WORK/index" --questions "$DATA/questions.train.jsonl" --out "$WORK/rag_train.jsonl" -k $K
[ -f "$WORK/adapter/adapter_model.safetensors" ] ||
    $PHI3FAST train --model "$MODEL" --data "$WORK/rag_train.jsonl" --out "$WORK/adapter" \
        --max-steps 6 --batch-size 1 --seq-len 640 --lr 1e-3 --rank 8 --alpha 16 --warmup 1 --save-every 0 --seed 0

HELDOUT="$DATA/questions.heldout.jsonl"
if [ -n "${HELDOUT_FIRST:-}" ]; then
    head -n "$HELDOUT_FIRST" "$HELDOUT" > "$WORK/heldout.first$HELDOUT_FIRST.jsonl"
    HELDOUT="$WORK/heldout.first$HELDOUT_FIRST.jsonl"
    RESULTS="$RESULTS.first$HELDOUT_FIRST"
fi
for modes in ${MODES:-rag,ft+rag base,rag,ft,ft+rag}; do
    $PHI3FAST eval --model "$MODEL" --adapter "$WORK/adapter" --index "$WORK/index" \
        --questions "$HELDOUT" --out "$RESULTS" -k $K --max-new-tokens 24 --dequantize --modes "$modes"
done
