"""Errors a user can act on. The CLI prints them as one line `jaxalign: <message>` and exits 2.

Each names what is wrong where: the file, line or record, field or key, and what was expected.
"""


class UserError(Exception):
    """Base of every error caused by input the user can fix (config, data, checkpoint)."""


class ConfigError(UserError, ValueError):
    """A configuration file or override is wrong."""


class DataError(UserError, ValueError):
    """A data file or record is malformed."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (non-finite loss, bad setup)."""
