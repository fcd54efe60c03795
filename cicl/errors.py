"""User-facing errors: the CLI prints their message (what is wrong, what to do) and exits 2."""

from cicl.config import ConfigError


class CICLError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class InputError(CICLError):
    """The input data cannot be used as given."""


class InputWarning(UserWarning):
    """Something about the input the user should look at; the CLI prints it as one
    ``warning: ...`` line."""


__all__ = ["CICLError", "ConfigError", "InputError", "InputWarning"]
