#!/usr/bin/env bash
# RAG, fine-tuning or both, measured on a real model: the README's four-mode table and chart.
#
# 1. index the labelled plant corpus (bench/data/plant/corpus) in short chunks (80 embedder tokens: 2 passages
#    keep a RAG prompt near 330 tokens, affordable to train on a CPU);
# 2. split the TRAIN half of the questions: every 4th question is held back for validation (13), the rest (40)
#    make the training rows: `rag-data` with 3 rows per question (passages rotated), targets that copy the
#    sentence stating the answer and cite [n];
# 3. train a QLoRA adapter (NF4 base) with checkpoints; score checkpoints' ft+rag on the validation
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
#        elsewhere.
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

# The training run: 120 rows (40 questions x 3), 60 steps of one row at lr 1e-3 (rank 16, alpha 32, seed 0),
# a checkpoint every 10 steps; the checkpoints at steps 20 and 40 and the final adapter (step 60) are scored.
[ -f "$WORK/fit_rows.jsonl" ] ||
    $PHI3FAST rag-data --index "$WORK/index80" --questions "$WORK/fit.jsonl" --out "$WORK/fit_rows.jsonl" \
        -k $K --rows-per-question 3 --no-gold-fraction 0.2
[ -f "$WORK/adapterA/adapter_model.safetensors" ] ||
    $PHI3FAST train --model "$MODEL" --data "$WORK/fit_rows.jsonl" --out "$WORK/adapterA" --max-steps 60 \
        --batch-size 1 --seq-len 512 --lr 1e-3 --rank 16 --alpha 32 --warmup 4 --save-every 10 --seed 0 --no-progress
for step in 20 40 60; do
    adapter="$WORK/adapterA_s$step"
    if [ $step = 60 ]; then
        adapter="$WORK/adapterA"
    else
        $PY bench/eval_real_ckpt.py "$WORK/adapterA/checkpoints/step-$step" "$adapter" --rank 16 --alpha 32
    fi
    $PHI3FAST eval --model "$MODEL" --adapter "$adapter" --index "$WORK/index80" --questions "$WORK/val.jsonl" \
        --out "$WORK/val_adapterA_s$step" -k $K --max-new-tokens $NEW --dequantize --modes ft+rag --no-progress \
        > /dev/null
done

# The best checkpoint on the validation questions: highest ft+rag accuracy, then the earlier run and step.
$PY - "$WORK" > "$WORK/selection.txt" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
scores = []
for d in sorted(p for p in work.glob("val_adapter*_s*") if p.is_dir()):
    run, step = d.name.removeprefix("val_adapter").split("_s")
    acc = json.loads((d / "report.json").read_text())["modes"]["ft+rag"]["accuracy"]
    scores.append((-acc, run, int(step)))
    print(f"run {run} step {step}: ft+rag accuracy on the validation questions {acc:.3f}")
acc, run, step = min(scores)
print(f"chosen: adapter{run}" + ("" if step == 60 else f"_s{step}"))
EOF
cat "$WORK/selection.txt"
chosen=$(tail -n 1 "$WORK/selection.txt" | cut -d' ' -f2)
rm -rf "$WORK/adapter" && cp -r "$WORK/$chosen" "$WORK/adapter"

for modes in base,rag base,rag,ft,ft+rag; do
    $PHI3FAST eval --model "$MODEL" --adapter "$WORK/adapter" --index "$WORK/index80" \
        --questions "$DATA/questions.heldout.jsonl" --out "$OUT" -k $K --max-new-tokens $NEW --dequantize --modes "$modes"
done
