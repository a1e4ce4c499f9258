#!/usr/bin/env bash
# Reproduce docs/RESULTS.md (HAPT-HAR): pretrain with the official budget, then linear probe and
# fine-tune at 1/5/10/100% labels, 3 seeds, with random-init and supervised-from-scratch baselines.
# Resumable: every step is skipped when its output exists; pretraining resumes from its last
# checkpoint (same run name). Run it again after an interruption. Chunks: CHUNK_STEPS optimizer steps
# per invocation of the pretraining command (0 = run to the end).
#
#   bash benchmarks/reproduce_hapt_har.sh                 # everything, official budget
#   FT_EPOCHS=20 FT_PATIENCE=10 bash benchmarks/reproduce_hapt_har.sh   # reduced fine-tuning budget (as in RESULTS.md)
#   STOP_AT=3400 bash benchmarks/...                      # stop pretraining at this step, evaluate that checkpoint
#   SELECT=0 bash benchmarks/...                          # evaluate the last checkpoint, not the one val selects
#   FT_HEAD_INIT=random,probe bash benchmarks/...         # fine-tuning also tries a head started from the probe
#                                                           (LP-FT), val keeps one
#
# Pretraining keeps a checkpoint every 500 steps (all 16 of them); `timemae evaluate select` then
# picks the one whose linear probe is best on val (test never read), and that one is evaluated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TM=${TM:-.venv/bin/timemae}
RUN=${RUN:-har_official}
THREADS=${THREADS:-1}
CHUNK_STEPS=${CHUNK_STEPS:-1000}
TOTAL_STEPS=7800            # 100 epochs x 78 batches of 128 (10046 train windows, last batch dropped)
STOP_AT=${STOP_AT:-$TOTAL_STEPS}
SELECT=${SELECT:-1}
FT_EPOCHS=${FT_EPOCHS:-100} # official fine-tuning budget (configs/eval/finetune.yaml)
FT_PATIENCE=${FT_PATIENCE:-10}
FT_HEAD_INIT=${FT_HEAD_INIT:-random}  # finetune.head_init of the pretrained encoder's fine-tuning
OUT=${OUT:-runs/eval_${RUN}}
mkdir -p runs "$OUT"
export OMP_NUM_THREADS=$THREADS

source benchmarks/hapt_har_eval.sh
[ -f stores/hapt_har/manifest.json ] || $TM data prepare configs/data/hapt_har.yaml

last_step() { ls -d "runs/$RUN"/checkpoint_* 2>/dev/null | sed 's/.*checkpoint_0*//' | sort -n | tail -1 || true; }
step=$(last_step); step=${step:-0}
while [ "$step" -lt "$STOP_AT" ]; do
  target=$STOP_AT
  if [ "$CHUNK_STEPS" -gt 0 ] && [ $((step + CHUNK_STEPS)) -lt "$STOP_AT" ]; then target=$((step + CHUNK_STEPS)); fi
  echo "== pretrain $RUN: step $step -> $target ($(date -u +%FT%TZ))"
  # (`timemae pretrain --single-process ...` is the same command)
  /usr/bin/time -f "pretrain chunk wall %e s" $PY -m launch.pretrain --single-process configs/pretrain/har.yaml \
    trainer.cpus_per_worker=$THREADS trainer.stop_after=$target run.name=$RUN run.storage_path=runs \
    run.checkpoint_every=500 run.keep_checkpoints=20 run.log_every=20 2>&1 | tee -a "runs/$RUN.log"
  step=$(last_step)
done
CKPT=runs/$RUN/$(printf 'checkpoint_%07d' "$STOP_AT")
[ -d "$CKPT" ] || CKPT=$(ls -d "runs/$RUN"/checkpoint_* | tail -1)
if [ "$SELECT" = 1 ] && [ "$STOP_AT" = "$TOTAL_STEPS" ]; then
  CKPT=$(hapt_har_select "runs/$RUN" "$OUT/select" "$OUT/select.log")
fi
echo "== evaluating $CKPT"

FT="finetune.epochs=$FT_EPOCHS finetune.patience=$FT_PATIENCE"
# linear: pretrained + random-init probes + supervised-from-scratch (fine-tuning loop with the
# configs/eval/finetune.yaml settings, hence min_steps_per_epoch=4); finetune: pretrained only,
# so the scratch baseline is trained once. Both run in parallel (one thread each).
# shellcheck disable=SC2086
hapt_har_eval linear "$CKPT" "$OUT/linear" "$OUT/linear.log" --baselines finetune.min_steps_per_epoch=4 $FT --plot &
# shellcheck disable=SC2086
hapt_har_eval finetune "$CKPT" "$OUT/finetune" "$OUT/finetune.log" $FT "finetune.head_init=[$FT_HEAD_INIT]" --plot &
wait
tail -n 3 "$OUT/linear.log" "$OUT/finetune.log" | grep -v '^{'
