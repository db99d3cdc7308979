"""User-facing failures.

Raise GrowrunError with a one-line message that names the bad value and what is allowed (or
what to do). The CLI prints it as `growrun: error: <message>` and exits with status 2, without
a traceback and before anything half-written is left behind.
"""


class GrowrunError(Exception):
    """A failure the user can fix (bad config value, missing data, ...)."""


class Diverged(GrowrunError):
    """The training loss became NaN or infinite (summary status "diverged")."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM / SIGINT / SIGUSR2 after writing its checkpoint (summary status
    "interrupted"). A KeyboardInterrupt, so that it also ends a sweep; exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
