"""The one exception type for mistakes a user can make: the CLI prints it as one line."""


class EngramError(Exception):
    """Bad input, a missing file, a refused overwrite: anything the user can fix.

    Bugs raise ordinary exceptions so that they still show a traceback.
    """
