"""Errors that reach the user as one clear message and exit code 2 (never a traceback)."""


class UserError(Exception):
    """A mistake the user can fix (bad spec, bad URI, missing file, cluster too small).

    The message names the field or argument and says what to do; the CLI prints it and exits 2.
    """


class SpecError(UserError):
    """The job spec is missing, malformed or invalid."""
