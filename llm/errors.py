"""The one root of the errors our code raises on purpose.

Entry points (train.py, python -m llm.*) print an ``LLMError``'s message on one line and exit 2: the message names
the file, key or value at fault. Anything else, a library's ValueError included, is a bug and keeps its traceback.
"""


class LLMError(Exception):
    """An error raised on purpose, whose message alone tells the user what to fix."""


class UserError(LLMError, ValueError):
    """A wrong path, key or value given by the user; the message names it."""


class DataError(UserError):
    """Input data that cannot be used as given; the message names the file (and line) and what to do."""
