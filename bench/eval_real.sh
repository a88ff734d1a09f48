#!/usr/bin/env bash
# RAG, fine-tuning or both, measured on a real model: the README's four-mode table and chart.
#
# 1. index the labelled plant corpus (bench/data/plant/corpus) in short chunks (80 embedder tokens: 2 passages
#    keep a RAG prompt near 330 tokens, affordable to train on a CPU);
# 2. split the TRAIN half of the questions: every 4th question is held back for validation (13), the rest (40)
#    make the training rows: `rag-data` with 3 rows per question (passages rotated), targets that copy the
#    sentence stating the answer and cite [n];
# 3. train QLoRA adapters (NF4 base) with checkpoints; score every checkpoint's ft+rag on the validation
#    questions; the best one (accuracy, then the earlier step) is the adapter. Nothing here reads the held-out half;
# 4. eval on the HELD-OUT half, all four modes (base and rag first: they do not need the adapter).
# Everything lands in bench/eval_real/ (report.json, report.md, report.png, answers.jsonl, run.json) and
# $WORK/selection.txt (the validation scores).
#
# OMP_NUM_THREADS=1: on a CPU shared with other busy processes, torch's two threads per process oversubscribe the
# cores; one thread made training ~30x faster on this project's loaded 2-core machine.
#
# Usage: bench/eval_real.sh [MODEL_DIR]   (default: SmolLM2-135M-Instruct converted to Phi-3 layout by
#        `phi3fast convert`, as `make demo` caches it in ~/.cache/phi3fast). WORK=/path keeps the index and adapters
#        elsewhere; RUNS="A B" picks training runs among those below.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-${DEMO_CACHE:-$HOME/.cache/phi3fast}/smollm2-135m-instruct-phi3}
WORK=${WORK:-/tmp/phi3fast-eval-real}
OUT=bench/eval_real
DATA=bench/data/plant
PHI3FAST=${PHI3FAST:-.venv/bin/phi3fast}
PY=${PY:-.venv/bin/python}
K=2
NEW=64
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK" "$OUT"

[ -f "$WORK/index80/MANIFEST.json" ] ||
    $PHI3FAST index "$DATA/corpus" --out "$WORK/index80" --chunk-tokens 80 --overlap 16
awk 'NR % 4 == 0' "$DATA/questions.train.jsonl" > "$WORK/val.jsonl"
awk 'NR % 4 != 0' "$DATA/questions.train.jsonl" > "$WORK/fit.jsonl"

# Training runs: NAME NO_GOLD_FRACTION STEPS LR WARMUP SAVE_EVERY (rank 16, alpha 32, batch 1, seed 0).
declare -A RUN=([A]="0.2 60 1e-3 4 10" [B]="0.1 180 5e-4 10 30")
declare -A ROWS=([A]=fit_rows.jsonl [B]=fit_rows_b.jsonl)
for name in ${RUNS:-A B}; do
    read -r nogold steps lr warmup every <<< "${RUN[$name]}"
    [ -f "$WORK/${ROWS[$name]}" ] ||
        $PHI3FAST rag-data --index "$WORK/index80" --questions "$WORK/fit.jsonl" --out "$WORK/${ROWS[$name]}" \
            -k $K --rows-per-question 3 --no-gold-fraction "$nogold"
    [ -f "$WORK/adapter$name/adapter_model.safetensors" ] ||
        $PHI3FAST train --model "$MODEL" --data "$WORK/${ROWS[$name]}" --out "$WORK/adapter$name" \
            --max-steps "$steps" --batch-size 1 --seq-len 512 --lr "$lr" --rank 16 --alpha 32 --warmup "$warmup" \
            --save-every "$every" --seed 0 --no-progress
    for ckpt in "$WORK/adapter$name"/checkpoints/step-*; do
        step=${ckpt##*step-}
        $PY bench/eval_real_ckpt.py "$ckpt" "$WORK/adapter${name}_s$step" --rank 16 --alpha 32
        $PHI3FAST eval --model "$MODEL" --adapter "$WORK/adapter${name}_s$step" --index "$WORK/index80" \
            --questions "$WORK/val.jsonl" --out "$WORK/val_adapter${name}_s$step" -k $K --max-new-tokens $NEW --dequantize \
            --modes ft+rag --no-progress > /dev/null
    done
done

# The best checkpoint on the validation questions: highest ft+rag accuracy, then the earlier run and step.
$PY - "$WORK" > "$WORK/selection.txt" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
scores = []
for d in sorted(work.glob("val_adapter*_s*")):
    run, step = d.name.removeprefix("val_adapter").split("_s")
    acc = json.loads((d / "report.json").read_text())["modes"]["ft+rag"]["accuracy"]
    scores.append((-acc, run, int(step)))
    print(f"run {run} step {step}: ft+rag accuracy on the validation questions {acc:.3f}")
acc, run, step = min(scores)
print(f"chosen: adapter{run}_s{step}")
EOF
cat "$WORK/selection.txt"
chosen=$(tail -n 1 "$WORK/selection.txt" | cut -d' ' -f2)
rm -rf "$WORK/adapter" && cp -r "$WORK/$chosen" "$WORK/adapter"

for modes in base,rag base,rag,ft,ft+rag; do
    $PHI3FAST eval --model "$MODEL" --adapter "$WORK/adapter" --index "$WORK/index80" \
        --questions "$DATA/questions.heldout.jsonl" --out "$OUT" -k $K --max-new-tokens $NEW --dequantize --modes "$modes"
done
