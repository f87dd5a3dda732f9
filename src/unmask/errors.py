"""User-facing errors.

Anything a user can cause (a bad strategy string, a missing checkpoint, a block length that does
not divide the generation length) raises `UnmaskError` with one sentence that says what was wrong
and what to do. The CLI turns it into one line on stderr and exit code 2; the server into a 4xx, except
`NonFiniteLogitsError` (the model, not the request, is at fault), which the server answers with a 500.
"""


class UnmaskError(Exception):
    """A problem with the user's input, explained in one sentence."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field  # the offending setting, when there is one (the server reports it)

    def __str__(self) -> str:
        return self.message


class NonFiniteLogitsError(UnmaskError):
    """The model returned NaN or infinite logits where the decode reads them; the decode was stopped.

    Raised by the decode loop right after the model call that produced them. `details` maps each
    affected batch row to (bad positions, positions checked, that row's model call number,
    its block index); `num_blocks` is the number of blocks, one for all rows or a dict row -> blocks
    (sequences of one decode may have different generation lengths); `describe(who)` words the
    message for another audience (the server names the request, the bench the problem). The CLI prints the message and exits 2; the server answers 500.
    """

    HINT = "try --dtype fp32 (bf16 and fp16 overflow sooner) or check the checkpoint's weights"

    def __init__(self, details: dict[int, tuple[int, int, int, int]], num_blocks: int | dict[int, int],
                 verifying: bool = False, who: str | None = None):
        self.details = {int(row): tuple(int(v) for v in info) for row, info in details.items()}
        self.num_blocks = ({int(row): int(n) for row, n in num_blocks.items()} if isinstance(num_blocks, dict)
                           else int(num_blocks))
        self.verifying = bool(verifying)
        super().__init__(self.describe(who))

    @property
    def row(self) -> int:
        """The first affected batch row (the sequence the message names)."""
        return min(self.details)

    def describe(self, who: str | None = None, row: int | None = None) -> str:
        """The message, naming batch row `row` (default: the first affected) as `who`."""
        row = self.row if row is None else row
        bad, checked, call, block = self.details[row]
        blocks = self.num_blocks[row] if isinstance(self.num_blocks, dict) else self.num_blocks
        who = who or f"sequence {row} of the batch"
        others = len(self.details) - 1
        more = f" (and {others} other sequence{'s' if others > 1 else ''} of the batch)" if others else ""
        doing = ", verifying drafts" if self.verifying else ""
        return (f"the model returned NaN or infinite logits for {who}{more} at its model call {call} "
                f"(block {block + 1} of {blocks}{doing}): {bad} of {checked} generation positions; "
                f"the decode was stopped; {self.HINT}")

    def __reduce__(self):  # picklable (a Ray worker sends it back), message included
        return (type(self), (self.details, self.num_blocks, self.verifying), {"message": self.message, "field": self.field})
