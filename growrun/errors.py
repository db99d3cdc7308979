"""User-facing failures.

Raise GrowrunError with a one-line message that names the bad value and what is allowed (or
what to do). The CLI prints it as `growrun: error: <message>` and exits with status 2, without
a traceback and before anything half-written is left behind.
"""


class GrowrunError(Exception):
    """A failure the user can fix (bad config value, missing data, ...)."""
