"""Errors caused by what the user gave us (config, checkpoint files, workdir), as opposed to bugs.

`main.py` prints a `UserError` as one line naming the key, file or value and what was expected, and
exits with status 2; anything else is a bug and keeps its traceback. Data problems raise
`data.records.DataError` (the data package never imports this one); main.py treats it the same.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The message says which key, file or value, and what was expected."""


class ConfigError(UserError, ValueError):
    """A config value out of its valid range or inconsistent with another one."""


class CheckpointError(UserError, ValueError):
    """A model or adapter checkpoint on disk that is missing, truncated or of an unsupported form."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be written, or holds another run's state."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory named by the config does not exist."""
