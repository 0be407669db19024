#!/bin/bash
# One trial of a sweep per SLURM array task, without Ray (the paper protocol).
#
#   synqt slurm array configs/sweeps/vtab1k.yaml data_root=/data/vtab-1k storage_path=/shared/runs
# or by hand (N = number of trials in `synqt sweep FILE ... --dry-run`, C = tasks at once):
#   jid=$(sbatch --parsable --array=0-$((N-1))%C slurm/vtab_array.sh SWEEP.yaml key=value ...)
#   sbatch --dependency=afterany:$jid --wrap "synqt aggregate STORAGE_PATH/NAME"
#
# Array task i runs trial i of that plan (`synqt slurm task SWEEP i key=value ...`). A trial
# resumes from its run directory's last checkpoint, and a finished trial is skipped, so a
# requeued (preempted, time-limited) or resubmitted task continues where it stopped.
#
# Environment: SYNQT_VENV (virtualenv to activate), SYNQT_MODULES (modules to load),
# SYNQT_SETUP (shell snippet to eval), SYNQT_BIN (synqt command, default synqt),
# SYNQT_REQUEUE (1 default: requeue the task after the time-limit warning; 0: just stop).
#
#SBATCH --job-name=synqt-array
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
##SBATCH --gpus=1                   # uncomment on GPU clusters (or pass --gpus=1)
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

set -uo pipefail
log() { echo "[vtab_array.sh $(date +%H:%M:%S)] $*" >&2; }

[[ $# -ge 1 ]] || { log "usage: sbatch --array=0-N slurm/vtab_array.sh SWEEP_FILE [key=value ...]"; exit 2; }
[[ -n "${SLURM_ARRAY_TASK_ID:-}" ]] || { log "not an array task (SLURM_ARRAY_TASK_ID unset): use sbatch --array"; exit 2; }
SWEEP="$1"
shift

if [[ -n "${SYNQT_MODULES:-}" ]]; then
    # shellcheck disable=SC2086
    module load $SYNQT_MODULES || exit 2
fi
# shellcheck disable=SC1091
[[ -n "${SYNQT_VENV:-}" ]] && { source "$SYNQT_VENV/bin/activate" || exit 2; }
[[ -n "${SYNQT_SETUP:-}" ]] && { eval "$SYNQT_SETUP" || exit 2; }
read -r -a SYNQT <<<"${SYNQT_BIN:-synqt}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

TASK_ID="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
CHILD=""
REQUEUE=0

stop_child() {
    # the engine checkpoints every epoch; SIGTERM ends the trial, the next run resumes from there
    [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null || return 0
    kill -TERM "$CHILD" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$CHILD" 2>/dev/null || return 0; sleep 1; done
    kill -KILL "$CHILD" 2>/dev/null
}
on_usr1() {
    log "time limit warning (USR1): stopping trial $SLURM_ARRAY_TASK_ID"
    [[ "${SYNQT_REQUEUE:-1}" == 1 ]] && REQUEUE=1
    stop_child
    if [[ $REQUEUE == 1 ]]; then
        log "requeueing $TASK_ID (it resumes from the run directory's checkpoint)"
        scontrol requeue "$TASK_ID" || log "scontrol requeue failed: resubmit by hand"
    fi
    exit 0
}
on_term() { log "cancelled or preempted: stopping"; stop_child; exit 143; }
trap on_usr1 USR1
trap on_term TERM INT

log "array task $TASK_ID on $(hostname -s): ${SYNQT[*]} slurm task $SWEEP $SLURM_ARRAY_TASK_ID $*"
"${SYNQT[@]}" slurm task "$SWEEP" "$SLURM_ARRAY_TASK_ID" "$@" &
CHILD=$!
wait "$CHILD"
rc=$?
CHILD=""
log "trial $SLURM_ARRAY_TASK_ID exited with $rc"
exit "$rc"
