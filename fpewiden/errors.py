"""The one exception type users see: its message is printed as a single line and the CLI exits with code 2."""


class FpewidenError(Exception):
    """A failure caused by the user's input (bad file, bad flag, impossible request), not by a bug."""


class EmptyLayerError(FpewidenError):
    """A budget that would leave a layer's matrix with no weights: `fpewiden run` records such a conversion as
    left out (with this reason) and goes on with the others, since the others' hours of work are still good."""
