#!/usr/bin/env bash
# Install the real-image collections the tests and benchmarks check defaults on (Debian packages):
# oxygen-icon-theme (8,813 PNG icons at 8-256 px, in context folders), gnome-backgrounds (wallpapers)
# and dataset-fashion-mnist (Fashion-MNIST, idx files). Tests that need them skip with a reason
# only where they are absent; CI installs them here so that it runs those tests.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends oxygen-icon-theme gnome-backgrounds dataset-fashion-mnist

for path in /usr/share/icons/oxygen/base/64x64 /usr/share/backgrounds/gnome \
            /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz; do
    [ -e "$path" ] || { echo "install_datasets.sh: $path missing after install" >&2; exit 1; }
done
echo "install_datasets.sh: icons, wallpapers and Fashion-MNIST installed"
