"""Errors a user can cause. The CLI prints any of them as one line; library callers can tell them apart.

Bugs raise ordinary exceptions so that they still show a traceback. `choose` is the one check of
a name against the choices of a `Literal` type (a dtype, a sharding, a layout).
"""

from typing import TypeVar

Name = TypeVar("Name", bound=str)


class EngramError(Exception):
    """Bad input, a missing file, a refused overwrite: anything the user can fix."""


class UsageError(EngramError):
    """An argument, option or spec value that cannot work (a bad dtype, too many shards, ...)."""


class FormatError(EngramError):
    """A file or store that is not what it claims to be: unreadable, malformed or self-contradictory."""


class ChecksumError(FormatError):
    """Bytes that fail the checksum their format carries (a damaged shard, checkpoint or archive)."""


class IncompleteStoreError(EngramError):
    """A table store whose build or import has not finished: resume or rebuild it before use."""


class OutputExistsError(EngramError):
    """The output already exists and replacing it was not asked for."""


class ResourceError(EngramError):
    """Not enough disk space or memory for the work asked, or a limit that bounds it."""


def choose(value: object, allowed: tuple[Name, ...], message: str) -> Name:
    """`value` as the one of `allowed` it names, else a UsageError: where a name typed as a string
    (an option, an untyped caller's argument) enters a signature that takes a `Literal`.

    `message` is formatted with `value` and `allowed` (the choices joined by ", ").
    """
    for name in allowed:
        if value == name:
            return name
    raise UsageError(message.format(value=value, allowed=", ".join(map(str, allowed))))
