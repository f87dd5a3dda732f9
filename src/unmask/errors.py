"""User-facing errors.

Anything a user can cause (a bad strategy string, a missing checkpoint, a block length that does
not divide the generation length) raises `UnmaskError` with one sentence that says what was wrong
and what to do. The CLI turns it into one line on stderr and exit code 2; the server into a 4xx.
"""


class UnmaskError(Exception):
    """A problem with the user's input, explained in one sentence."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field  # the offending setting, when there is one (the server reports it)

    def __str__(self) -> str:
        return self.message
