#!/bin/bash
# Pretrain TimeMAE on a Slurm allocation: bring up a Ray cluster on the allocated nodes
# (head on the first node, one Ray worker node per other node), run the pretraining driver
# against it, tear the cluster down.
#
#   sbatch [--nodes N] [--gpus-per-node G] [--cpus-per-task C] [--time T] [--job-name NAME] \
#          slurm/pretrain.sh CONFIG [key=value ...]
#
# Submit from the repository root (or set TIMEMAE_ROOT): CONFIG and relative paths in the
# overrides are relative to it. The overrides are those of `timemae pretrain`. Unless given:
#   trainer.num_workers   = GPUs in the allocation, or (CPUs of the allocation) / cpus_per_worker
#   trainer.use_gpu       = true when the allocation has GPUs
#   run.storage_path      = $TIMEMAE_STORAGE, else the config's run.storage_path, else ./runs
#                           (made absolute; it must be on storage every node sees)
#   run.name              = the job name (--job-name); with no --job-name: pretrain-<job id>
# Re-running with the same storage path + name resumes from the latest checkpoint, so
# `scontrol requeue <job>` (same job id) and a resubmission with the same --job-name resume.
#
# Defaults below (#SBATCH lines); everything can be overridden on the sbatch command line.
# No partition or account is set: add -p/-A on the command line (or SBATCH_PARTITION/
# SBATCH_ACCOUNT) as your site requires.
#   --nodes=1              nodes; one Ray node per Slurm node
#   --ntasks-per-node=1    one Ray node process per Slurm node (keep 1)
#   --cpus-per-task=4      CPUs per node given to Ray (--num-cpus)
#   GPUs                   none by default; add --gpus-per-node=G (Ray --num-gpus = G)
#   --time=04:00:00        wall time; on timeout the trap stops the cluster cleanly
#   --output               slurm-<job name>-<job id>.out in the submit directory, appended on requeue
#   --requeue              `scontrol requeue` / preemption re-runs the job, which resumes
#
# Environment knobs (all optional):
#   TIMEMAE_ROOT          repository root (default: the submit directory)
#   TIMEMAE_PYTHON        python to run (default: $TIMEMAE_ROOT/.venv/bin/python, else python3);
#                         `ray` is taken from the same bin directory
#   TIMEMAE_STORAGE       default run.storage_path
#   RAY_PORT              GCS port of the head (default: derived from the job id, 20000-32400);
#                         every other Ray port of the job lies in [RAY_PORT, RAY_PORT+RAY_PORT_BLOCK)
#   RAY_PORT_BLOCK        ports reserved per node (default 200: 10 service ports + worker ports)
#   RAY_NODE_PORT_STRIDE  shift of each node's ports by node index (default 0; set it to
#                         RAY_PORT_BLOCK when several Slurm nodes share one host, e.g. emulation)
#   RAY_HEAD_IP           address of the head (default: the head's NodeAddr in Slurm, resolved)
#   RAY_TMPDIR            node-local directory for Ray's temp dirs (default /tmp; keep it short,
#                         Ray's unix sockets live there)
#   RAY_OBJECT_STORE_MEMORY  bytes of object store per node (default: Ray's)
#   RAY_DASHBOARD         1 = start the Ray dashboard on the head (port RAY_PORT+2); default 0
#   RAY_START_TIMEOUT     seconds to wait for all nodes to join (default 300)
#   RAY_AUTH_MODE         token (default: a fresh random token per job, in RAY_AUTH_TOKEN)
#                         or disabled; set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH to use your own
#
# Logs: the driver prints to this job's output file; its last line is the JSON summary.
# <run dir>/slurm/job-<job id>[-restart<n>]/ holds driver.out (the driver's output),
# ray-node<i>-<node>.log (each node's `ray start`) and, copied when the job ends,
# ray-node<i>-<node>/ (that node's Ray session logs: raylet, gcs_server, worker-*.out).
# Signals: scancel / time limit (SIGTERM) stop the driver and the Ray nodes and exit 143.
# With `#SBATCH --signal=B:USR1@300`, the job requeues itself 5 minutes before its time limit.
#
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue

set -uo pipefail

log() { echo "[pretrain.sh $(date +%H:%M:%S)] $*"; }
die() { echo "[pretrain.sh] error: $*" >&2; exit 2; }

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^#SBATCH/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit with: sbatch slurm/pretrain.sh CONFIG [key=value ...]"

CONFIG=$1
shift
OVERRIDES=("$@")

# --- where things are ---------------------------------------------------------------------
ROOT=${TIMEMAE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT" || die "cannot cd to TIMEMAE_ROOT=$ROOT"
if [[ -n ${TIMEMAE_PYTHON:-} ]]; then
    PY=$TIMEMAE_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python
else
    PY=$(command -v python3 || command -v python) || die "no python found; set TIMEMAE_PYTHON"
fi
RAY=$(dirname "$PY")/ray
[[ -x $RAY ]] || RAY=$(command -v ray) || die "no 'ray' next to $PY nor on PATH; pip install 'ray[train]'"
[[ -f $CONFIG ]] || die "config $CONFIG not found (relative to $ROOT)"

# --- the allocation -----------------------------------------------------------------------
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NNODES=${#NODES[@]}
HEAD=${NODES[0]}
CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus_per_node() {
    local g
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then g=${SLURM_GPUS_PER_NODE##*:}; echo "${g%%(*}"; return; fi
    if [[ -n ${SLURM_GPUS:-} ]]; then g=${SLURM_GPUS##*:}; echo $(((g + NNODES - 1) / NNODES)); return; fi
    if [[ -n ${SLURM_JOB_GPUS:-} ]]; then tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .; return; fi
    echo 0
}
GPUS_PER_NODE=$(gpus_per_node)
[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || GPUS_PER_NODE=0

# --- run settings: overrides > environment > config file > job-derived defaults -----------
# One python call reads the YAML + overrides (naively: dotted keys, YAML-typed values); the
# driver validates everything itself.
read_setting() {  # KEY -> value from overrides, else from the config file, else empty
    "$PY" - "$CONFIG" "$1" "${OVERRIDES[@]}" <<'EOF'
import sys, yaml
cfg, key, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
for o in reversed(overrides):
    k, sep, v = o.partition("=")
    if sep and k.strip() == key:
        print(v)
        sys.exit()
node = yaml.safe_load(open(cfg)) or {}
for part in key.split("."):
    node = node.get(part) if isinstance(node, dict) else None
if node is not None:
    print(str(node).lower() if isinstance(node, bool) else node)
EOF
}
has_override() { local o; for o in "${OVERRIDES[@]}"; do [[ ${o%%=*} == "$1" ]] && return 0; done; return 1; }

EXTRA=()
if has_override run.storage_path; then
    STORAGE=$(read_setting run.storage_path)
else
    STORAGE=${TIMEMAE_STORAGE:-$(read_setting run.storage_path)}
    STORAGE=${STORAGE:-runs}
fi
STORAGE=$(realpath -m "$STORAGE")
has_override run.storage_path || EXTRA+=("run.storage_path=$STORAGE")
RUN_NAME=$(read_setting run.name)
if [[ -z $RUN_NAME || $RUN_NAME == None || $RUN_NAME == null ]]; then
    if [[ ${SLURM_JOB_NAME:-pretrain.sh} == pretrain.sh ]]; then
        RUN_NAME=pretrain-$SLURM_JOB_ID   # no --job-name: unique per job, kept by requeue
    else
        RUN_NAME=$SLURM_JOB_NAME
    fi
    EXTRA+=("run.name=$RUN_NAME")
fi
if ((GPUS_PER_NODE > 0)) && ! has_override trainer.use_gpu; then
    EXTRA+=("trainer.use_gpu=true")
fi
if ! has_override trainer.num_workers; then
    if ((GPUS_PER_NODE > 0)); then
        NUM_WORKERS=$((GPUS_PER_NODE * NNODES))
    else
        CPW=$(read_setting trainer.cpus_per_worker)
        CPW=${CPW:-1}
        NUM_WORKERS=$((CPUS_PER_NODE / CPW * NNODES))
        ((NUM_WORKERS >= 1)) || die "cpus-per-task=$CPUS_PER_NODE < trainer.cpus_per_worker=$CPW: no room for a worker"
    fi
    EXTRA+=("trainer.num_workers=$NUM_WORKERS")
fi
RUN_DIR=$STORAGE/$RUN_NAME
LOG_DIR=$RUN_DIR/slurm/job-$SLURM_JOB_ID
((${SLURM_RESTART_COUNT:-0} > 0)) && LOG_DIR+=-restart$SLURM_RESTART_COUNT
mkdir -p "$LOG_DIR" || die "cannot create $LOG_DIR (run.storage_path must be writable from every node)"

# --- Ray cluster settings -----------------------------------------------------------------
export RAY_PORT_BLOCK=${RAY_PORT_BLOCK:-200}
# Default block: 20000 + 200 x (job id mod 63), i.e. within 20000-32599, clear of Ray's own
# defaults (6379, 8265, 10001, workers 10002-19999) and of Linux's ephemeral ports (32768+).
export RAY_PORT=${RAY_PORT:-$((20000 + (SLURM_JOB_ID % 63) * 200))}
export RAY_NODE_PORT_STRIDE=${RAY_NODE_PORT_STRIDE:-0}
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp}
export RAY_DASHBOARD=${RAY_DASHBOARD:-0}
export RAY_OBJECT_STORE_MEMORY=${RAY_OBJECT_STORE_MEMORY:-}
export RAY_DISABLE_USAGE_STATS=1
export CPUS_PER_NODE GPUS_PER_NODE RAY
export NODE_LIST="${NODES[*]}"
unset RAY_ADDRESS
# Ray >= 2.5x authenticates clients with a token when one exists. Every node and the driver
# must agree, so decide for the whole job: by default token auth with a fresh per-job token
# (passed to the nodes by srun's environment, never written to disk); RAY_AUTH_MODE=disabled
# opts out; RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH bring your own token.
if [[ ${RAY_AUTH_MODE:-token} == token ]]; then
    export RAY_AUTH_MODE=token
    if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
        export RAY_AUTH_TOKEN
    fi
fi
if [[ -z ${RAY_HEAD_IP:-} ]]; then
    addr=$(scontrol show node "$HEAD" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    addr=${addr:-$HEAD}
    if [[ $addr =~ ^[0-9.]+$ ]]; then
        RAY_HEAD_IP=$addr
    else
        RAY_HEAD_IP=$(getent ahostsv4 "$addr" | awk 'NR==1 {print $1}')
    fi
    [[ -n $RAY_HEAD_IP ]] || die "cannot resolve the head node $HEAD to an IPv4 address; set RAY_HEAD_IP"
fi
export RAY_HEAD_IP
export HEAD_ADDRESS=$RAY_HEAD_IP:$RAY_PORT

# One Ray node; runs inside `srun` on its node. Its ports are the job's block shifted by
# node index x RAY_NODE_PORT_STRIDE: +0 GCS (head), +1 client server, +2 dashboard,
# +3 node manager, +4 object manager, +5/+6 dashboard agent http/grpc, +7 runtime env agent,
# +8 metrics, +10..+BLOCK-1 worker processes.
ray_node() {
    local idx=0 n base tmp
    for n in $NODE_LIST; do [[ $n == "$SLURMD_NODENAME" ]] && break; idx=$((idx + 1)); done
    base=$((RAY_PORT + idx * RAY_NODE_PORT_STRIDE))
    tmp=$RAY_TMPDIR/ray-$SLURM_JOB_ID-$idx
    rm -rf "$tmp" && mkdir -p "$tmp" || exit 1
    local args=(--num-cpus "$CPUS_PER_NODE" --num-gpus "$GPUS_PER_NODE" --temp-dir "$tmp"
        --node-manager-port $((base + 3)) --object-manager-port $((base + 4))
        --dashboard-agent-listen-port $((base + 5)) --dashboard-agent-grpc-port $((base + 6))
        --runtime-env-agent-port $((base + 7)) --metrics-export-port $((base + 8))
        --min-worker-port $((base + 10)) --max-worker-port $((base + RAY_PORT_BLOCK - 1))
        --disable-usage-stats --block)
    [[ -n $RAY_OBJECT_STORE_MEMORY ]] && args+=(--object-store-memory "$RAY_OBJECT_STORE_MEMORY")
    if [[ $1 == head ]]; then
        args+=(--head --node-ip-address "$RAY_HEAD_IP" --port "$RAY_PORT"
            --ray-client-server-port $((base + 1)) --dashboard-port $((base + 2)))
        if [[ $RAY_DASHBOARD == 1 ]]; then args+=(--include-dashboard=true --dashboard-host=0.0.0.0)
        else args+=(--include-dashboard=false); fi
    else
        args+=(--address "$HEAD_ADDRESS")
    fi
    echo "ray node $idx ($1) on $SLURMD_NODENAME: ray start ${args[*]}"
    # Ray processes that look the cluster up themselves (state API, Train's placement-group
    # cleaner) must not guess among other Ray instances on the node: tell them.
    export RAY_ADDRESS=$HEAD_ADDRESS
    exec "$RAY" start "${args[@]}"
}

# Copy each node's Ray session logs into the run directory and remove its temp dir.
collect_node() {
    local idx=0 n tmp
    for n in $NODE_LIST; do [[ $n == "$SLURMD_NODENAME" ]] && break; idx=$((idx + 1)); done
    tmp=$RAY_TMPDIR/ray-$SLURM_JOB_ID-$idx
    if [[ -d $tmp/session_latest/logs ]]; then
        mkdir -p "$LOG_DIR/ray-node$idx-$SLURMD_NODENAME"
        cp -rL "$tmp/session_latest/logs/." "$LOG_DIR/ray-node$idx-$SLURMD_NODENAME/" 2>/dev/null
    fi
    rm -rf "$tmp"
}
export LOG_DIR
SRUN_NODE=(srun --overlap --nodes=1 --ntasks=1 --cpus-per-task="$CPUS_PER_NODE" --kill-on-bad-exit=0)

# --- teardown (idempotent; also run by the traps) -----------------------------------------
NODE_PIDS=()
DRIVER_PID=
TORN_DOWN=0
teardown() {
    ((TORN_DOWN)) && return
    TORN_DOWN=1
    local pid
    if [[ -n $DRIVER_PID ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null
        for _ in $(seq 15); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$DRIVER_PID" 2>/dev/null
    fi
    # SIGTERM to a node's srun ends its `ray start --block`, which stops exactly the Ray
    # processes it started (a plain `ray stop` would also kill other jobs' Ray on the node).
    for pid in "${NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 10); do
        local alive=0
        for pid in "${NODE_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 1
    done
    for pid in "${NODE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    ((${#NODE_PIDS[@]})) || return 0
    timeout 60 srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
        bash -c "$(declare -f collect_node); collect_node" >/dev/null 2>&1 || true
}
on_signal() {
    trap '' TERM INT USR1
    log "received SIG$1: stopping the driver and the Ray cluster"
    teardown
    exit "$2"
}
on_usr1() {  # sent by `#SBATCH --signal=B:USR1@SECONDS` before the time limit
    log "time limit near: requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_usr1' USR1
trap 'teardown' EXIT

# --- bring the cluster up -----------------------------------------------------------------
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s): ${NODES[*]}; $CPUS_PER_NODE CPUs + $GPUS_PER_NODE GPUs per node"
log "run dir $RUN_DIR; Ray head $HEAD ($HEAD_ADDRESS); Ray logs -> $LOG_DIR"
"${SRUN_NODE[@]}" -w "$HEAD" bash -c "$(declare -f ray_node); ray_node head" \
    >"$LOG_DIR/ray-node0-$HEAD.log" 2>&1 &
NODE_PIDS+=($!)
for ((i = 1; i < NNODES; i++)); do
    "${SRUN_NODE[@]}" -w "${NODES[$i]}" bash -c "$(declare -f ray_node); ray_node worker" \
        >"$LOG_DIR/ray-node$i-${NODES[$i]}.log" 2>&1 &
    NODE_PIDS+=($!)
done

# Wait until every node has joined: one python process polls the GCS (and gives up early if
# a node's srun died).
"$PY" - "$HEAD_ADDRESS" "$NNODES" "${RAY_START_TIMEOUT:-300}" "${NODE_PIDS[@]}" <<'EOF' &
import logging, os, sys, time
address, want, timeout, pids = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
deadline = time.monotonic() + timeout

def dead_pids():
    out = []
    for p in pids:
        try:
            os.kill(int(p), 0)
        except OSError:
            out.append(p)
    return out

import ray
alive, err = 0, None
while time.monotonic() < deadline:
    if dead_pids():
        print(f"a Ray node exited during start-up (see {os.environ['LOG_DIR']}/ray-node*.log)", file=sys.stderr)
        sys.exit(1)
    try:
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                     configure_logging=False)
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive >= want:
            res = ray.cluster_resources()
            print(f"[pretrain.sh] ray cluster up: {alive}/{want} nodes alive, "
                  f"CPU={res.get('CPU', 0):g} GPU={res.get('GPU', 0):g}")
            sys.exit(0)
    except Exception as e:  # GCS not up yet
        err = e
    time.sleep(2)
print(f"only {alive}/{want} Ray nodes joined {address} within {timeout:g}s "
      f"(last error: {err}); see {os.environ['LOG_DIR']}/ray-node*.log; raise RAY_START_TIMEOUT "
      "or check that the nodes can reach each other on these ports", file=sys.stderr)
sys.exit(1)
EOF
WAIT_PID=$!
while :; do
    wait "$WAIT_PID"
    rc=$?
    kill -0 "$WAIT_PID" 2>/dev/null || break
done
((rc == 0)) || {
    for f in "$LOG_DIR"/ray-node*.log; do echo "--- $f (tail)" >&2; tail -n 15 "$f" >&2; done
    die "Ray cluster did not come up (status $rc)"
}

# --- run the driver -----------------------------------------------------------------------
export RAY_ADDRESS=$HEAD_ADDRESS
log "driver: $PY -u -m launch.pretrain $CONFIG ${OVERRIDES[*]} ${EXTRA[*]}"
# The driver writes to a file that `tail` streams into the job output, so that the summary
# can be repeated last if Ray's worker-log forwarding printed after it.
DRIVER_OUT=$LOG_DIR/driver.out
: >"$DRIVER_OUT"
"$PY" -u -m launch.pretrain "$CONFIG" "${OVERRIDES[@]}" "${EXTRA[@]}" >>"$DRIVER_OUT" 2>&1 &
DRIVER_PID=$!
tail -n +1 -f --pid="$DRIVER_PID" "$DRIVER_OUT" &
TAIL_PID=$!
while :; do  # `wait` returns early when a trapped signal (USR1) arrives
    wait "$DRIVER_PID"
    RC=$?
    kill -0 "$DRIVER_PID" 2>/dev/null || break
done
DRIVER_PID=
wait "$TAIL_PID" 2>/dev/null
teardown
SUMMARY=$(grep -E '^\{.*"steps"' "$DRIVER_OUT" | tail -n 1)
if ((RC == 0)) && [[ -n $SUMMARY && $(tail -n 1 "$DRIVER_OUT") != "$SUMMARY" ]]; then
    echo "$SUMMARY"
fi
exit "$RC"
