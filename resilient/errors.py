"""Errors that reach the user as one clear message and exit code 2 (never a traceback)."""


class UserError(Exception):
    """A mistake the user can fix (bad spec, bad URI, missing file, cluster too small).

    The message names the field or argument and says what to do; the CLI prints it and exits 2.
    """


class SpecError(UserError):
    """The job spec is missing, malformed or invalid."""


class Abort(BaseException):
    """End the job at once (a second SIGTERM/SIGINT, or a stop's grace ran out). A BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way swallows it; the supervisor
    turns it into a terminal state before it goes on up."""

    def __init__(self, reason: str, signum: int | None = None):
        super().__init__(reason)
        self.reason, self.signum = reason, signum
