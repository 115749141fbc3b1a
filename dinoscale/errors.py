"""User-facing errors: the CLI prints their one-line message and exits 2.

Raise a subclass of `DinoscaleError` for input the user got wrong (a config key, a path,
a file that is not a checkpoint). Real bugs keep raising ordinary exceptions.
"""


class DinoscaleError(Exception):
    """A mistake in user input; the message says what, where and how to fix it."""


class ConfigError(DinoscaleError):
    """A configuration key, type or value is invalid."""


class DataError(DinoscaleError):
    """A dataset, pool or shard cannot be read as asked."""


class CheckpointError(DinoscaleError):
    """A checkpoint or weights file does not match what was asked for."""


class SlurmError(DinoscaleError):
    """SLURM is unreachable, a partition is unknown, or a submitted job failed."""
