"""Running curation on every rank of a process group: torchrun, or the tasks of a SLURM job.

`curation_ranks` starts the process group when the process was launched as one of several ranks
(a single process stays a world of one, with no group), checks that every rank runs the same
configuration, writes each rank's log to `OUTPUT/logs/rankNNNNN.log`, and makes a failure on one
rank end the job with that rank's error instead of a hang: the failing rank writes its error next
to its log before it exits, and a rank whose collective then breaks (gloo notices a peer that
left at once; every collective also has `curation.distributed_timeout_s`) raises that error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dinoscale.config import config_hash
from dinoscale.curation.collective import Comm
from dinoscale.errors import DinoscaleError
from dinoscale.utils.logging import get_logger, log_to_file

log = get_logger(__name__)

LOGS = "logs"
PEER_ERROR_WAIT_S = 10.0


class RankFailedError(DinoscaleError):
    """Another rank of the job failed; the message is its error."""


def launched_as_ranks() -> bool:
    """Whether torchrun or a multi-task SLURM job started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1 and \
        "SLURM_PROCID" in os.environ


@contextlib.contextmanager
def curation_ranks(cfg: DictConfig) -> Iterator[Comm]:
    """The block runs on every rank of the job (see the module docstring); yields this rank's Comm."""
    if not launched_as_ranks() or (dist.is_available() and dist.is_initialized()):
        yield Comm.current()
        return
    from dinoscale.distributed import process_group

    logs = Path(cfg.curation.output_dir) / LOGS
    with process_group(timedelta(seconds=cfg.curation.distributed_timeout_s)):
        comm = Comm.current()
        handler = log_to_file(logs / f"rank{comm.rank:05d}.log")
        error_file = logs / f"rank{comm.rank:05d}.error"
        error_file.unlink(missing_ok=True)
        try:
            comm.check_same({"config": config_hash(OmegaConf.to_container(cfg, resolve=True))}, "configuration",
                            "start every rank with the same command and overrides")
            yield comm
        except Exception as error:
            if isinstance(error, RankFailedError) or not _collective_broke(error):
                log.exception("rank %d failed", comm.rank)
                error_file.write_text(f"{type(error).__name__}: {error}\n")
                raise
            raise _peer_failure(logs, comm.rank, error) from error
        finally:
            logging.getLogger("dinoscale").removeHandler(handler)


def _collective_broke(error: BaseException) -> bool:
    """A torch.distributed failure (a peer left, a timeout), not a mistake of this rank."""
    return isinstance(error, (dist.DistError, RuntimeError)) and not isinstance(error, DinoscaleError) and any(
        word in str(error).lower() for word in ("connection", "timed out", "timeout", "closed", "peer", "nccl"))


def _peer_failure(logs: Path, rank: int, error: BaseException) -> RankFailedError:
    """The error of the rank that failed first, as this rank's error."""
    deadline = time.monotonic() + PEER_ERROR_WAIT_S
    while time.monotonic() < deadline:
        found = sorted(p for p in logs.glob("rank*.error") if p.name != f"rank{rank:05d}.error")
        if found:
            return RankFailedError(f"{found[0].stem} failed: {found[0].read_text().strip()} "
                                   f"(every rank's log is in {logs})")
        time.sleep(0.2)
    return RankFailedError(f"a collective of rank {rank} failed ({error}); another rank stopped or hung: see the "
                           f"logs in {logs}")
