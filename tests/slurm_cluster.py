"""A throw-away SLURM cluster on localhost for tests: munged, MariaDB, slurmdbd, slurmctld, slurmd.

Everything the cluster uses is private to one temporary directory: its own munge key and socket,
its own database (datadir, socket, port), free TCP ports, spool and state directories. It needs
neither systemd nor a configured system SLURM or munge, and two clusters can run side by side.
It must run as root (slurmd starts job steps as the submitting user) and needs Debian's slurm-wlm
and MariaDB packages (`.ci/install_slurm.sh` installs them).

Client commands (sbatch, sacct, scontrol, ... which submitit runs) find the cluster through
`SLURM_CONF`: use `cluster.activate(monkeypatch)` in a test, or `cluster.env` for a subprocess.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

CLIENT_BINARIES = ("sinfo", "sbatch", "srun", "sacct", "sacctmgr", "scontrol", "scancel", "squeue")
DAEMON_BINARIES = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLUSTER_NAME = "dinotest"
# Variables an enclosing SLURM job or submitit task sets; they would mislead sbatch/srun/submitit here.
JOB_VARIABLE_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_")


def missing_binaries() -> list[str]:
    return [name for name in DAEMON_BINARIES + CLIENT_BINARIES if shutil.which(name) is None]


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message carries the daemons' log tails."""


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen
    log: Path  # its stdout and stderr: every daemon here runs in the foreground and logs there


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return "(no file)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"


def client_environment(conf_path: str | Path) -> dict[str, str]:
    """The caller's environment pointed at one cluster, without variables of an enclosing SLURM job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(JOB_VARIABLE_PREFIXES)}
    env["SLURM_CONF"] = str(conf_path)
    return env


class LocalSlurmCluster:
    """Start with `with LocalSlurmCluster() as cluster:`; `conf_path`, `env` and `partition` describe it."""

    def __init__(self, *, partition: str = "debug", cpus: int = 4, memory_mb: int = 8192,
                 startup_timeout_s: float = 60.0, attempts: int = 2) -> None:
        # cpus may exceed the machine's cores (`SlurmdParameters=config_overrides`): test jobs mostly wait.
        self.partition = partition
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.startup_timeout_s = startup_timeout_s
        self.attempts = attempts
        self.root = Path(tempfile.mkdtemp(prefix="dinoscale-slurm-"))
        self.conf_path = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf_path)}
        self._daemons: list[Daemon] = []
        self._ports: dict[str, int] = {}

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ClusterStartError("the local SLURM cluster must run as root (slurmd starts job steps as their user)")
        missing = missing_binaries()
        if missing:
            raise ClusterStartError(f"missing binaries {missing}: run .ci/install_slurm.sh")
        for attempt in range(1, self.attempts + 1):
            try:
                self._start_once()
                return
            except ClusterStartError:
                self.stop()
                if attempt == self.attempts:
                    raise
                shutil.rmtree(self.root)  # a fresh start with fresh ports
                self.root.mkdir(mode=0o700)

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons this object started, newest first, by PID."""
        if any(d.name == "slurmctld" and d.process.poll() is None for d in self._daemons):
            self._cancel_all_jobs()
        for daemon in reversed(self._daemons):
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
                try:
                    daemon.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    daemon.process.kill()
                    daemon.process.wait(timeout=10)
        self._daemons = []

    def activate(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this test's SLURM client commands (and the jobs they submit) at this cluster."""
        for name in list(os.environ):
            if name.startswith(JOB_VARIABLE_PREFIXES):
                monkeypatch.delenv(name)
        monkeypatch.setenv("SLURM_CONF", str(self.conf_path))

    def run(self, *command: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(command, env=client_environment(self.conf_path), capture_output=True, text=True,
                              check=check, timeout=timeout)

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- {d.name}: {d.log} (last {lines} lines)\n{_tail(d.log, lines)}" for d in self._daemons)

    # ------------------------------------------------------------------ start-up
    def _start_once(self) -> None:
        ports = _free_ports(4)
        self._ports = dict(zip(("slurmctld", "slurmd", "slurmdbd", "mariadb"), ports))
        # munged insists that everyone may traverse the directories above its socket.
        self.root.chmod(0o711)
        for sub in ("munge", "db", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o711 if sub == "munge" else 0o700, exist_ok=True)
        self._write_configs()
        self._start_munge()
        self._start_mariadb()
        self._start_daemon("slurmdbd", ["slurmdbd", "-D"])
        self._wait_until("slurmdbd accepts connections", lambda: _port_open(self._ports["slurmdbd"]))
        self._start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)])
        self._wait_until("slurmctld answers `scontrol ping`", self._controller_up)
        self._start_daemon("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf_path)])
        self._wait_until(f"node localhost is idle in partition {self.partition}", self._node_idle)
        self._wait_until("slurmctld registered the cluster with slurmdbd", self._cluster_registered)
        self._wait_until("`sacct` answers", lambda: self._client_ok("sacct", "-n", "-X"))

    def _write_configs(self) -> None:
        r, p = self.root, self._ports
        munge_socket = r / "munge" / "munge.socket"
        self.conf_path.write_text(f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={p['slurmctld']}
SlurmdPort={p['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~11 s instead of ~2 min (5 works too, but leaves
# a loaded machine little time to launch a job step before its credential expires).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# sched_interval=1: a requeued job starts as soon as it is eligible, not at the next 60 s scheduling pass.
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={p['slurmdbd']}
# For the slurmdbd connection this names the munge socket.
AccountingStoragePass={munge_socket}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        dbd_conf = r / "slurmdbd.conf"  # slurmdbd looks for it next to $SLURM_CONF
        dbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={p['slurmdbd']}
SlurmUser=root
PidFile={r / 'slurmdbd.pid'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={p['mariadb']}
StorageUser=root
StorageLoc=slurm_acct_db
""")
        dbd_conf.chmod(0o600)

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._start_daemon("munged", [
            "munged", "--foreground", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}"])
        self._wait_until("munged created its socket", (munge / "munge.socket").exists)

    def _start_mariadb(self) -> None:
        db = self.root / "db"
        server_options = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M", "--innodb-use-native-aio=0"]
        install = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve", *server_options],
            capture_output=True, text=True, timeout=120)
        if install.returncode != 0:
            raise ClusterStartError(f"mariadb-install-db failed:\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")
        self._start_daemon("mariadbd", [
            "mariadbd", "--no-defaults", f"--datadir={db}", f"--socket={self.root / 'mariadb.sock'}",
            f"--port={self._ports['mariadb']}", "--bind-address=127.0.0.1", "--user=root",
            f"--pid-file={self.root / 'mariadb.pid'}", "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=0",
            *server_options])
        self._wait_until("MariaDB accepts connections", lambda: _port_open(self._ports["mariadb"]))

    def _start_daemon(self, name: str, command: list[str]) -> None:
        log = self.root / "log" / f"{name}.log"
        with open(log, "wb") as stream:
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=client_environment(self.conf_path), cwd=self.root)
        self._daemons.append(Daemon(name, process, log))

    def _wait_until(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            for daemon in self._daemons:
                if daemon.process.poll() is not None:
                    raise ClusterStartError(f"{daemon.name} exited with code {daemon.process.returncode} while "
                                            f"waiting until {what}\n{self.log_tails()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"timed out after {self.startup_timeout_s:.0f} s waiting until {what}\n"
                                        f"{self.log_tails()}")
            time.sleep(0.2)

    def _client_ok(self, *command: str) -> bool:
        try:
            return self.run(*command, check=False, timeout=15).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _controller_up(self) -> bool:
        try:
            return "UP" in self.run("scontrol", "ping", check=False, timeout=15).stdout
        except subprocess.TimeoutExpired:
            return False

    def _node_idle(self) -> bool:
        try:
            out = self.run("sinfo", "-h", "-p", self.partition, "-o", "%t", check=False, timeout=15).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "idle"

    def _cluster_registered(self) -> bool:
        try:
            out = self.run("sacctmgr", "-n", "-P", "show", "cluster", "format=cluster", check=False, timeout=15).stdout
        except subprocess.TimeoutExpired:
            return False
        return CLUSTER_NAME in out.split()

    def _cancel_all_jobs(self) -> None:
        try:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False, timeout=15).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False, timeout=15)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "R,CG", "-o", "%A",
                                                               check=False, timeout=15).stdout.strip():
                    time.sleep(0.3)
        except subprocess.TimeoutExpired:
            pass
