#!/usr/bin/env bash
# Install the system packages the SLURM tests need: slurmctld/slurmd with munge authentication and
# slurmdbd accounting on MariaDB (Debian's slurm-wlm). Run as root, or as a user with sudo.
# The tests' fixture (tests/slurm_cluster.py) starts private daemons itself — its own munge key and
# socket, database, ports and spool — so nothing is configured or started here.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
    munge slurmctld slurmd slurm-client slurmdbd mariadb-server

for binary in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sinfo sbatch srun sacct sacctmgr \
              scontrol scancel squeue; do
    command -v "$binary" >/dev/null || { echo "install_slurm.sh: $binary missing after install" >&2; exit 1; }
done
echo "install_slurm.sh: $(slurmctld -V) and MariaDB $(mariadbd --version | awk '{print $3}') installed"
