#!/bin/bash
# Run a SynQT sweep on a SLURM allocation: a private Ray cluster on the allocated nodes, then
# `synqt sweep` against it.
#
#   sbatch slurm/vtab.sh configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k storage_path=/shared/runs
#   sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 --time=48:00:00 slurm/vtab.sh SWEEP.yaml ...
#
# Arguments: the sweep file, then `synqt sweep` overrides (key=value) and flags, passed through.
# Every #SBATCH line below can be overridden on the sbatch command line (see above).
#
# Environment (set before sbatch; sbatch exports your environment to the job):
#   SYNQT_VENV          virtualenv/conda prefix to activate (sources $SYNQT_VENV/bin/activate)
#   SYNQT_MODULES       space-separated environment modules to `module load` first
#   SYNQT_SETUP         any shell snippet to eval before starting (e.g. "conda activate synqt")
#   SYNQT_BIN           the synqt command (default: synqt)
#   SYNQT_RAY_BIN       the ray command (default: ray)
#   RAY_PORT_BASE       first port of the per-job port range (default 12000)
#   RAY_PORT_STRIDE     ports per job (default 200; slot = SLURM_JOB_ID % RAY_PORT_SLOTS)
#   RAY_PORT_SLOTS      number of slots (default 100: ports 12000-31999, below Linux ephemeral ports)
#   SYNQT_RAY_TMP       parent of the per-job dir (default /tmp; Ray socket paths must stay short)
#   SYNQT_JOIN_TIMEOUT  seconds to wait for all nodes to join Ray (default 300)
#   SYNQT_STOP_GRACE    seconds the sweep gets to save its state after SIGINT (default 120;
#                       keep it below the --signal lead time)
#   SYNQT_REQUEUE       1 (default): requeue the job after the time-limit warning; 0: just stop
#   SYNQT_HEAD_IP       address Ray binds to on the head node (default: the node's own address)
#
# Security: Ray runs with token authentication (RAY_AUTH_MODE=token); the token is random per
# job, lives in <per-job dir>/auth_token (mode 600, dir mode 700) on every node, and the
# dashboard / job server listen on the head node's address, not on 0.0.0.0. To talk to the
# cluster from the head node while the job runs (address printed in the log; Ray's own
# files are under <per-job dir>/r):
#   RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/ray-<jobid>/auth_token ray status --address HEAD:PORT
#
#SBATCH --job-name=synqt-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
##SBATCH --gpus-per-node=1          # uncomment on GPU clusters (or pass --gpus-per-node=N)
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -uo pipefail

log() { echo "[vtab.sh $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 2; }

[[ $# -ge 1 ]] || die "usage: sbatch slurm/vtab.sh SWEEP_FILE [key=value ...] [synqt sweep flags]"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job (SLURM_JOB_ID unset); submit with sbatch"
SWEEP="$1"
shift

# ---------------------------------------------------------------- environment
if [[ -n "${SYNQT_MODULES:-}" ]]; then
    # shellcheck disable=SC2086
    module load $SYNQT_MODULES || die "module load $SYNQT_MODULES failed"
fi
if [[ -n "${SYNQT_VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$SYNQT_VENV/bin/activate" || die "cannot activate SYNQT_VENV=$SYNQT_VENV"
fi
if [[ -n "${SYNQT_SETUP:-}" ]]; then
    eval "$SYNQT_SETUP" || die "SYNQT_SETUP failed: $SYNQT_SETUP"
fi
read -r -a SYNQT <<<"${SYNQT_BIN:-synqt}"
RAY="${SYNQT_RAY_BIN:-ray}"
command -v "${SYNQT[0]}" >/dev/null || die "${SYNQT[0]} not found on PATH (set SYNQT_VENV or SYNQT_BIN)"
command -v "$RAY" >/dev/null || die "$RAY not found on PATH (set SYNQT_VENV or SYNQT_RAY_BIN)"
# a bare name (vtab1k, demo, ...) is a sweep shipped with synqt; synqt checks it in the dry run below
[[ -f "$SWEEP" || "$SWEEP" != */* ]] || die "sweep file $SWEEP not found (relative paths are taken from $(pwd))"

# ---------------------------------------------------------------- allocation
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
NNODES=${#NODES[@]}
HEAD_NODE=${NODES[0]}
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
GPUS=${SLURM_GPUS_ON_NODE:-0}
[[ "$GPUS" =~ ^[0-9]+$ ]] || GPUS=0
RAY_MEM_ARGS=()
if [[ -n "${SLURM_MEM_PER_NODE:-}" && "${SLURM_MEM_PER_NODE}" =~ ^[0-9]+$ && "${SLURM_MEM_PER_NODE}" -gt 0 ]]; then
    # give Ray the allocation's memory, not the node's (object store: 30% of it)
    mem_bytes=$((SLURM_MEM_PER_NODE * 1024 * 1024))
    RAY_MEM_ARGS=(--memory=$((mem_bytes * 7 / 10)) --object-store-memory=$((mem_bytes * 3 / 10)))
fi

if [[ -n "${SYNQT_HEAD_IP:-}" ]]; then
    HEAD_IP=$SYNQT_HEAD_IP
else
    HEAD_IP=$(getent ahostsv4 "$HEAD_NODE" 2>/dev/null | awk 'NR==1{print $1}')
    if [[ -z "$HEAD_IP" || "$HEAD_IP" == 127.* ]]; then
        # the batch script runs on the head node: take its first routable address
        HEAD_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
    fi
    [[ -n "$HEAD_IP" ]] || HEAD_IP=127.0.0.1
fi

# ---------------------------------------------------------------- per-job ports
port_busy() { (exec 3<>"/dev/tcp/$HEAD_IP/$1") 2>/dev/null; }
PORT_BASE=${RAY_PORT_BASE:-12000}
PORT_STRIDE=${RAY_PORT_STRIDE:-200}
PORT_SLOTS=${RAY_PORT_SLOTS:-100}
slot=$((SLURM_JOB_ID % PORT_SLOTS))
for _try in $(seq 1 "$PORT_SLOTS"); do
    base=$((PORT_BASE + slot * PORT_STRIDE))
    busy=0
    for off in 0 1 2 3 4 5 6 7 8; do
        if port_busy $((base + off)); then busy=1; break; fi
    done
    [[ $busy == 0 ]] && break
    log "ports $base.. in use on $HEAD_NODE, trying the next slot"
    slot=$(((slot + 1) % PORT_SLOTS))
done
GCS_PORT=$base
DASHBOARD_PORT=$((base + 1))
CLIENT_PORT=$((base + 2))
NODE_MANAGER_PORT=$((base + 3))
OBJECT_MANAGER_PORT=$((base + 4))
AGENT_GRPC_PORT=$((base + 5))
AGENT_HTTP_PORT=$((base + 6))
METRICS_PORT=$((base + 7))
RUNTIME_ENV_PORT=$((base + 8))
MIN_WORKER_PORT=$((base + 20))
MAX_WORKER_PORT=$((base + PORT_STRIDE - 1))
RAY_PORT_ARGS=(
    --node-manager-port="$NODE_MANAGER_PORT" --object-manager-port="$OBJECT_MANAGER_PORT"
    --dashboard-agent-grpc-port="$AGENT_GRPC_PORT" --dashboard-agent-listen-port="$AGENT_HTTP_PORT"
    --metrics-export-port="$METRICS_PORT" --runtime-env-agent-port="$RUNTIME_ENV_PORT"
    --min-worker-port="$MIN_WORKER_PORT" --max-worker-port="$MAX_WORKER_PORT"
)

# ---------------------------------------------------------------- per-job dir + token
JOB_DIR="${SYNQT_RAY_TMP:-/tmp}/ray-${SLURM_JOB_ID}"
TOKEN_FILE="$JOB_DIR/auth_token"
RAY_TMP_DIR="$JOB_DIR/r"   # Ray makes its temp dir world-writable: keep it inside the private dir
umask 077
rm -rf "$JOB_DIR"   # left over by an earlier run of this (requeued) job on this node
mkdir -p "$JOB_DIR" && chmod 700 "$JOB_DIR" || die "cannot create $JOB_DIR"
python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE" || die "cannot write $TOKEN_FILE"
chmod 600 "$TOKEN_FILE"
unset RAY_AUTH_TOKEN RAY_ADDRESS
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
export RAY_USAGE_STATS_ENABLED=0
RAY_ADDRESS_HP="$HEAD_IP:$GCS_PORT"
printf '%s\n' "$RAY_ADDRESS_HP" >"$JOB_DIR/address"

log "job $SLURM_JOB_ID: nodes=${NODES[*]} head=$HEAD_NODE ($HEAD_IP) cpus/node=$CPUS gpus/node=$GPUS"
log "ray: address $RAY_ADDRESS_HP, dashboard http://$HEAD_IP:$DASHBOARD_PORT, dir $JOB_DIR"
log "connect: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE ray status --address $RAY_ADDRESS_HP"

# ---------------------------------------------------------------- cleanup + signals
SRUN_PIDS=()
SWEEP_PID=""
STOPPING=0
REQUEUE=0

kill_job_ray() {
    # stop this job's Ray processes on this node only: they are the ones whose command line
    # names this job's private dir (never `ray stop`, which would hit the user's other jobs)
    local pids
    pids=$(pgrep -f -- "$JOB_DIR/" 2>/dev/null | grep -vx "$$" || true)
    [[ -n "$pids" ]] && kill -TERM $pids 2>/dev/null
    sleep 2
    pids=$(pgrep -f -- "$JOB_DIR/" 2>/dev/null | grep -vx "$$" || true)
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null
    true
}

stop_sweep() {
    [[ -n "$SWEEP_PID" ]] && kill -0 "$SWEEP_PID" 2>/dev/null || return 0
    log "stopping the sweep (SIGINT: Tune saves its state), grace ${SYNQT_STOP_GRACE:-120}s"
    kill -INT "$SWEEP_PID" 2>/dev/null
    local waited=0
    while kill -0 "$SWEEP_PID" 2>/dev/null && [[ $waited -lt ${SYNQT_STOP_GRACE:-120} ]]; do
        sleep 1; waited=$((waited + 1))
    done
    if kill -0 "$SWEEP_PID" 2>/dev/null; then
        log "sweep still running after ${waited}s: SIGTERM"
        kill -TERM "$SWEEP_PID" 2>/dev/null; sleep 5
        kill -KILL "$SWEEP_PID" 2>/dev/null
    fi
}

stop_ray() {
    log "stopping Ray"
    rm -f "$TOKEN_FILE"   # running Ray processes have read it already
    local p
    for p in "${SRUN_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    if [[ $NNODES -gt 1 ]]; then
        timeout 60 srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 \
            bash -c "$(declare -f kill_job_ray); JOB_DIR='$JOB_DIR'; kill_job_ray; rm -rf '$JOB_DIR'" \
            2>/dev/null || true
    fi
    kill_job_ray
    for p in "${SRUN_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    SRUN_PIDS=()
}

on_exit() {
    local rc=$?
    trap - EXIT TERM INT USR1
    stop_sweep
    stop_ray
    rm -rf "$JOB_DIR"
    if [[ $REQUEUE == 1 ]]; then
        log "requeueing job $SLURM_JOB_ID (it resumes the sweep from $STORAGE_HINT)"
        scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit by hand"
    fi
    exit "$rc"
}

on_usr1() {
    log "time limit warning (USR1)"
    STOPPING=1
    [[ "${SYNQT_REQUEUE:-1}" == 1 ]] && REQUEUE=1
    stop_sweep
    exit 0
}

on_term() {
    log "cancelled or preempted (SIGTERM/SIGINT): stopping"
    STOPPING=1
    stop_sweep
    exit 143
}

trap on_exit EXIT
trap on_usr1 USR1
trap on_term TERM INT

# ---------------------------------------------------------------- resume?
STORAGE_HINT="(unknown)"
PLAN_JSON=$("${SYNQT[@]}" sweep "$SWEEP" "$@" --dry-run --json) || die "synqt sweep $SWEEP --dry-run failed"
SWEEP_DIR=$(printf '%s' "$PLAN_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("sweep_dir",""))') \
    || die "cannot read sweep_dir from synqt sweep --dry-run --json"
STORAGE_HINT=$SWEEP_DIR
# one live owner per sweep folder (docs/hpc.md): a copy of this sweep still running elsewhere refuses this job
# before it starts Ray; a copy that ended, or an earlier run of this requeued job, is taken over by synqt sweep
OWNER=$(printf '%s' "$PLAN_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("owner") or "")') \
    || die "cannot read owner from synqt sweep --dry-run --json"
if [[ -n "$OWNER" ]]; then
    log "refused: $OWNER"
    exit 2
fi
RESUME=()
has_resume=0
for a in "$@"; do [[ "$a" == "--resume" ]] && has_resume=1; done
if [[ $has_resume == 0 && -n "$SWEEP_DIR" && -f "$SWEEP_DIR/plan.json" ]]; then
    log "$SWEEP_DIR already holds this sweep: resuming"
    RESUME=(--resume)
fi

# ---------------------------------------------------------------- start Ray
RAY_COMMON=(--num-cpus="$CPUS" --num-gpus="$GPUS" "${RAY_MEM_ARGS[@]}" "${RAY_PORT_ARGS[@]}"
            --temp-dir="$RAY_TMP_DIR" --disable-usage-stats --block)

srun --overlap --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" -w "$HEAD_NODE" \
    "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$GCS_PORT" \
    --dashboard-host="$HEAD_IP" --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" "${RAY_COMMON[@]}" &
SRUN_PIDS+=($!)

wait_port() {
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        port_busy "$1" && return 0
        for p in "${SRUN_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || return 1; done
        sleep 1
    done
    return 1
}
JOIN_TIMEOUT=${SYNQT_JOIN_TIMEOUT:-300}
wait_port "$GCS_PORT" "$JOIN_TIMEOUT" || die "Ray head did not come up on $RAY_ADDRESS_HP"

if [[ $NNODES -gt 1 ]]; then
    # the workers write the token into their own node's private dir (passed in the
    # environment, which only the user can read, never on a command line)
    # --wait=0 --kill-on-bad-exit=0: a worker node that dies (its Ray killed, the node lost) must not
    # take the other workers down with it, whatever the site's WaitTime / KillOnBadExit; Tune retries
    # that node's trials elsewhere from their epoch checkpoints
    SYNQT_TOKEN_IN=$(cat "$TOKEN_FILE") \
    srun --overlap --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 \
        --cpus-per-task="$CPUS" --exclude="$HEAD_NODE" --wait=0 --kill-on-bad-exit=0 \
        bash -c 'umask 077; rm -rf "$0"; mkdir -p "$0"; printf %s "$SYNQT_TOKEN_IN" >"$0/auth_token";
                 unset SYNQT_TOKEN_IN; exec "$@"' "$JOB_DIR" \
        "$RAY" start --address="$RAY_ADDRESS_HP" "${RAY_COMMON[@]}" &
    SRUN_PIDS+=($!)
fi

log "waiting for $NNODES node(s) to join (timeout ${JOIN_TIMEOUT}s)"
python3 - "$RAY_ADDRESS_HP" "$NNODES" "$JOIN_TIMEOUT" <<'EOF' || die "not all nodes joined the Ray cluster"
import sys, time
import ray
address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.time() + timeout
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
while True:
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    if alive >= want:
        print(f"[vtab.sh] {alive}/{want} node(s) up: {ray.cluster_resources()}", file=sys.stderr)
        break
    if time.time() > deadline:
        print(f"[vtab.sh] only {alive}/{want} node(s) joined in {timeout}s", file=sys.stderr)
        sys.exit(1)
    time.sleep(2)
ray.shutdown()
EOF

# ---------------------------------------------------------------- run the sweep
log "${SYNQT[*]} sweep $SWEEP $* --address $RAY_ADDRESS_HP ${RESUME[*]}"
"${SYNQT[@]}" sweep "$SWEEP" "$@" --address "$RAY_ADDRESS_HP" "${RESUME[@]}" &
SWEEP_PID=$!
# `wait` returns early when a trapped signal arrives; the handlers exit the script themselves
wait "$SWEEP_PID"
rc=$?
SWEEP_PID=""
log "synqt sweep exited with $rc"
exit "$rc"
