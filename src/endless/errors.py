"""User-facing errors.

Contract: every mistake a user can make (a missing file, a bad policy spec, an unsupported
architecture, a corrupt state file) raises :class:`EndlessError` with a one-line message. The CLI
prints that line to stderr and exits with code 2; it never shows a traceback for these.
"""


class EndlessError(Exception):
    """A user mistake, reported as one line and exit code 2 by the CLI."""
