#!/bin/bash
# Install SLURM + munge from Debian packages when absent (CI; tests/slurm_harness.py starts them),
# and iproute2 / util-linux for the multi-node harness (ip netns, nsenter, unshare, mount).
set -euo pipefail
need=0
for b in munged slurmctld slurmd sbatch srun sinfo squeue scontrol ip nsenter unshare mount; do
    command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || need=1
done
if [[ $need == 0 ]]; then
    echo "slurm_setup: SLURM, munge, iproute2 already installed ($(slurmctld -V 2>/dev/null || true))"
    exit 0
fi
SUDO=""
[[ $(id -u) == 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge iproute2 util-linux
echo "slurm_setup: installed $(slurmctld -V)"
