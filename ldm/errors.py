"""The one base class for mistakes a user can fix: a bad flag, file, config value or prompt.

Every command line catches `UserError` alone, prints its message as one line and exits with code 2;
anything else is a bug and keeps its traceback. The subclasses say where the mistake was found.
"""


class UserError(ValueError):
    """A mistake in what the user gave; the message is one line: what was wrong, what is valid."""


class ConfigError(UserError):
    """A config field (model preset or training recipe) that is wrong or unsupported; the message names it."""
