#!/usr/bin/env bash
# Install the system packages the SLURM tests need: a local slurmctld/slurmd with munge
# authentication and slurmdbd accounting on a private MariaDB (Debian slurm-wlm).
# Run as root (or with sudo available). The test fixture starts and stops the daemons itself;
# this script only installs them and keeps the packages' own services from starting.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
    munge slurmctld slurmd slurm-client slurmdbd mariadb-server

# munged refuses to start unless its run directory belongs to the munge user.
$SUDO install -d -o munge -g munge -m 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    $SUDO mungekey --create --keyfile /etc/munge/munge.key
    $SUDO chown munge:munge /etc/munge/munge.key
    $SUDO chmod 400 /etc/munge/munge.key
fi

for binary in sinfo sbatch sacct slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db; do
    command -v "$binary" >/dev/null || { echo "install_slurm.sh: $binary missing after install" >&2; exit 1; }
done
echo "install_slurm.sh: $(slurmctld -V) and MariaDB $(mariadbd --version | awk "{print \$3}") installed"
