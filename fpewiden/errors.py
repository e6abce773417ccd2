"""The one exception type users see: its message is printed as a single line and the CLI exits with code 2."""


class FpewidenError(Exception):
    """A failure caused by the user's input (bad file, bad flag, impossible request), not by a bug."""
