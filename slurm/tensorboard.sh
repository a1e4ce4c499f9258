#!/bin/bash
# Serve TensorBoard for pretraining runs, on a compute node (sbatch) or where you are (bash).
#
#   sbatch slurm/tensorboard.sh [LOGDIR] [PORT]      # a small job; prints how to forward the port
#   bash   slurm/tensorboard.sh [LOGDIR] [PORT]      # e.g. on a login node or your workstation
#
# LOGDIR defaults to ./runs (the default run.storage_path: every run's events are under
# <storage_path>/<run name>/tb/, so one TensorBoard shows all runs; pass runs/<name> for one).
# PORT defaults to $TB_PORT, else 16006 + (job id mod 1000) in a job (so two users on one node
# don't collide), else 6006. TensorBoard has no authentication: it listens on all interfaces
# (so the login node can reach it) unless TB_HOST is set, e.g. TB_HOST=localhost.
# TIMEMAE_PYTHON / TIMEMAE_ROOT as in slurm/pretrain.sh.
#
# Then, on your laptop:  ssh -N -L 6006:<node>:<port> <you>@<login node>  and open
# http://localhost:6006 (the exact command is printed at start-up). Stop it with scancel.
#
#SBATCH --job-name=tensorboard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^#SBATCH/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
ROOT=${TIMEMAE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT" || { echo "[tensorboard.sh] error: cannot cd to $ROOT" >&2; exit 2; }
if [[ -n ${TIMEMAE_PYTHON:-} ]]; then
    PY=$TIMEMAE_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=$(command -v python3 || command -v python)
fi
LOGDIR=$(realpath -m "${1:-runs}")
if [[ -n ${2:-} ]]; then
    PORT=$2
elif [[ -n ${TB_PORT:-} ]]; then
    PORT=$TB_PORT
elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    PORT=$((16006 + SLURM_JOB_ID % 1000))
else
    PORT=6006
fi
[[ -d $LOGDIR ]] || echo "[tensorboard.sh] note: $LOGDIR does not exist yet; TensorBoard shows runs as they appear"
"$PY" -c 'import tensorboard' 2>/dev/null || { echo "[tensorboard.sh] error: $PY has no tensorboard; pip install tensorboard" >&2; exit 2; }

NODE=$(hostname -s)
HOST_ARGS=(--bind_all)
[[ -n ${TB_HOST:-} ]] && HOST_ARGS=(--host "$TB_HOST")
echo "[tensorboard.sh] TensorBoard for $LOGDIR on $NODE:$PORT"
echo "[tensorboard.sh] from your laptop:  ssh -N -L 6006:$NODE:$PORT ${USER:-you}@<login node>   then open http://localhost:6006"
exec "$PY" -m tensorboard.main --logdir "$LOGDIR" --port "$PORT" "${HOST_ARGS[@]}"
