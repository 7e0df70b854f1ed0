"""Errors that the CLI turns into a one-line message and exit status 2."""


class SanitizeError(Exception):
    """A problem with the user's input (data, options, files) rather than a bug."""


class DataError(SanitizeError):
    """The data cannot be read or is not a usable image-classification dataset."""
