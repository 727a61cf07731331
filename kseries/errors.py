"""The one exception type the user sees: a message naming what is wrong, and a hint."""


class ToolkitError(Exception):
    """A failure the user can fix; the task edge prints it as one line plus a hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message
