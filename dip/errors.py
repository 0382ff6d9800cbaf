"""Errors that dip raises for input a user can fix."""


class DipError(ValueError):
    """A problem with the user's input or settings; the message says what to do."""


class ImageTooLargeError(DipError, MemoryError):
    """The fit would need more memory than the device has (the message gives the estimate)."""
