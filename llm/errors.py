"""The one exception type for user mistakes: the entry points print its message on one line and exit 2."""


class UserError(ValueError):
    """A wrong path, key or value given by the user; the message names it."""
