"""Is SLURM reachable from here, and does a partition exist? Checked before anything is submitted."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from dinoscale.errors import SlurmError

LOCAL_HINT = "or run on this machine with --local"


def list_partitions(timeout_s: float = 30.0) -> tuple[list[str], str | None]:
    """The partitions `sinfo` shows and the default one; raises SlurmError when SLURM is not reachable."""
    if shutil.which("sinfo") is None:
        raise SlurmError("SLURM is not reachable: `sinfo` is not on PATH. "
                         f"Submit from a SLURM login node, {LOCAL_HINT}")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SlurmError(f"SLURM is not reachable: SLURM_CONF points to {conf}, which is not a file. "
                         f"Fix or unset SLURM_CONF, {LOCAL_HINT}")
    where = f" (SLURM_CONF={conf})" if conf else ""
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"SLURM is not reachable: `sinfo` did not answer within {timeout_s:.0f} s{where}. "
                         f"Check the controller with `scontrol ping`, {LOCAL_HINT}") from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise SlurmError(f"SLURM is not reachable: `sinfo` failed{where}: {reason}. "
                         f"Check the controller with `scontrol ping`, {LOCAL_HINT}")
    names, default = [], None
    for line in out.stdout.split():
        name = line.rstrip("*")
        if line.endswith("*"):
            default = name
        if name not in names:
            names.append(name)
    return names, default


def check_slurm_reachable(timeout_s: float = 30.0) -> None:
    """Raise SlurmError with the reason and a fix when SLURM's controller cannot be queried from here."""
    list_partitions(timeout_s)


def check_partition(name: str, timeout_s: float = 30.0) -> None:
    """Raise SlurmError naming the existing partitions when `name` is not one of them."""
    names, default = list_partitions(timeout_s)
    if name not in names:
        listed = ", ".join(f"{n} (default)" if n == default else n for n in names) or "none"
        raise SlurmError(f"unknown SLURM partition '{name}'; this cluster has: {listed}. "
                         "Choose one of them, or leave the partition unset to use the default")
