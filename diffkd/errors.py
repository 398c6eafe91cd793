"""The one exception type a user should see: a message that names the problem and the fix.

The CLI prints ``str(error)`` as one line on stderr and exits with code 2; nothing else is written.
"""


class DiffkdError(Exception):
    """Bad input: a config, a teacher, data or a file that cannot be used as given."""


class TrainingDiverged(DiffkdError):
    """A loss or gradient became NaN/inf; the last good checkpoint is kept."""


class RunDoesNotFit(DiffkdError):
    """The accelerator ran out of memory in a step or a validation; the last checkpoint is kept."""
