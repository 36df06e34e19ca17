"""Errors the person running a command can fix.

The CLI prints a ``UserError`` as one line (``error: <message>``) and exits 2, with no traceback;
every other exception keeps its traceback, because it is a bug or an outage to investigate.
Messages name the input that is wrong and what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a fixable condition (a busy folder, an unreadable file, a changed recipe)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the command reads does not exist (or holds nothing usable yet)."""


class OutputExistsError(UserError, FileExistsError):
    """The command would overwrite something it must not."""
