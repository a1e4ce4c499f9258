# Sourced by reproduce_hapt_har.sh and ablations_hapt_har.sh: the evaluation (and selection) commands of
# docs/RESULTS.md, one place for both scripts. Needs $TM (the timemae executable).
#
#   hapt_har_eval KIND CHECKPOINT OUT LOG [extra evaluate args ...]
#
# runs `timemae evaluate KIND` (linear | finetune) on stores/hapt_har at 1/5/10/100 % labels with
# 3 seeds, writing OUT/results.json (+ results.md) and the console to LOG; skipped when
# OUT/results.json exists (resumable).
hapt_har_eval() {
  local kind=$1 ckpt=$2 out=$3 log=$4
  shift 4
  [ -f "$out/results.json" ] && return 0
  mkdir -p "$(dirname "$log")"
  /usr/bin/time -f "$kind $out wall %e s" "$TM" evaluate "$kind" "$ckpt" --store stores/hapt_har \
    --label-fraction 0.01 0.05 0.1 1.0 --seeds 3 "$@" --out "$out" --json > "$log" 2>&1
}

# hapt_har_select RUN_DIR OUT LOG: `timemae evaluate select` over the run's checkpoints (val only),
# OUT/selection.json kept (skipped when it exists); prints the selected checkpoint. Needs $TM, $PY.
hapt_har_select() {
  local run=$1 out=$2 log=$3
  [ -f "$out/selection.json" ] || "$TM" evaluate select "$run" --store stores/hapt_har --out "$out" > "$log" 2>&1
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$out/selection.json"
}
